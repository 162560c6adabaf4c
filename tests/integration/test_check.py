"""``tessera snapshots check``: a restore point proved usable without restoring it.

Two copies of the lab's guest disk (``plugins.lab.guest_disk``, built by libguestfs once per
session: ``tests.guest_disks``; MBR, ext4, XFS, NTFS, an ext4 LVM volume) are backed up with
the CLI: one clean, one whose ext4 block bitmap was zeroed with plain Python before the
backup (it still mounts; only a checker sees it). Through the appliance: the clean snapshot
passes with every filesystem checked by its own checker in no-write mode and the expected
paths present, and the check changes nothing in the store (the packs and snapshots byte for
byte, ``store verify`` clean, the restore identical to the image); an expected path that is
not there fails the check naming it; the damaged ext4 fails it naming the filesystem and
e2fsck's finding. ``tessera snapshots`` shows each verdict. An appliance that does not
boot in time leaves an ``error`` record. The daemon's checks are in ``test_check_daemon.py``
(a module of its own, so that xdist's ``--dist loadfile`` can run it beside these).

Faults of the record (``engine.restore.record``), on the real CLI: a store on a full tmpfs
(a real ENOSPC) — the check's verdict is printed, exit 1, the error names the record's file
and ENOSPC, the earlier record is byte for byte as it was, no temporary file, the store's
data untouched and ``store verify`` clean; EIO at each window of the atomic write
(failpoints, ``tests.faults.fail_cli``) — the same, never a torn record; a truncated or
edited record — ``tessera snapshots`` lists it ``UNREADABLE`` (naming the file, not its
content), the next check replaces it; a CLI SIGKILLed between writing the record and
renaming it — the ``.tmp`` it leaves is read by nothing, ``store verify`` stays clean, the
next check replaces both; a CLI SIGKILLed while its appliance is up — the helper and its
qemu end by themselves, the record and store are as they were, the next check works; a
daemon's check job whose record write fails ends failed saying both. Those checks that need
no verdict of a booted appliance take ``--launch-timeout 1`` (an ``error`` record, recorded
the same way) and boot nothing.

The appliance runs emulated (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``, see
``test_files.py``); each check is one appliance boot.
"""

import errno
import hashlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.api.server import build_app
from engine.core.units import MiB
from engine.restore.files import APPLIANCE_PREFIX
from plugins.lab.guest_disk import PARTITIONS
from tests.cli import Cli
from tests.daemon_setup import running
from tests.faults.harness import Inject
from tests.faults.harness import installed as failing
from tests.guest_disks import guest_disk_copy
from tests.integration.test_direct_writes import tiny_tmpfs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "TESSERA_PASSPHRASE": "test-pass",
    "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
}
RECORD = "restore-check.json"
SDA1_OFFSET = PARTITIONS[0][0] * MiB  # where the ext4 of /dev/sda1 starts in the image
CLI = Cli(passphrase="test-pass", env={"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}, timeout=900)
tessera, ok = CLI.run, CLI.ok


class Lab:
    def __init__(self, store: Path, image: Path, clean: str, damaged: str) -> None:
        self.store = store
        self.image = image  # the clean disk as it was backed up
        self.clean = clean
        self.damaged = damaged


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    tmp = tmp_path_factory.mktemp("check")
    image = guest_disk_copy(tmp_path_factory, tmp / "check-vm.raw")
    broken = guest_disk_copy(tmp_path_factory, tmp / "broken-vm.raw")
    zero_ext4_block_bitmap(broken)
    store = tmp / "store"
    ok("store", "init", store)
    ok("backup", "image", image, "--store", store, "--vm", "check-vm", "--level", "full")
    ok("backup", "image", broken, "--store", store, "--vm", "broken-vm", "--level", "full")
    broken.unlink()
    return Lab(store, image, _snapshot_of(store, "check-vm"), _snapshot_of(store, "broken-vm"))


def zero_ext4_block_bitmap(image: Path, offset: int = SDA1_OFFSET) -> int:
    """Overwrite the block bitmap of block group 0 of the ext4 filesystem at ``offset`` of
    ``image`` with zeros (every block free, the group's checksum wrong): the filesystem still
    mounts, and ``e2fsck -n`` reports block bitmap differences. Returns the bitmap's offset
    in the image."""
    with image.open("r+b") as f:
        f.seek(offset + 1024)  # the superblock
        sb = f.read(1024)
        assert struct.unpack_from("<H", sb, 0x38)[0] == 0xEF53, "not an ext2/3/4 superblock"
        first_data_block, log_block_size = struct.unpack_from("<II", sb, 0x14)
        block = 1024 << log_block_size
        f.seek(offset + (first_data_block + 1) * block)  # the group descriptors follow it
        (bitmap_block,) = struct.unpack_from("<I", f.read(32), 0)  # bg_block_bitmap_lo
        where = offset + bitmap_block * block
        f.seek(where)
        f.write(bytes(block))
    return where


def _snapshot_of(store: Path, vm: str) -> str:
    (doc,) = json.loads(ok("snapshots", "--store", store, "--vm", vm, "--json"))
    return str(doc["id"])


def _listed(store: Path, snapshot: str) -> tuple[str, dict[str, Any]]:
    """The snapshot's line of ``tessera snapshots`` and its ``check`` of ``--json``."""
    (line,) = [s for s in ok("snapshots", "--store", store).splitlines() if s.startswith(snapshot)]
    docs = json.loads(ok("snapshots", "--store", store, "--json"))
    (doc,) = [d for d in docs if d["id"] == snapshot]
    return line, doc["check"]


def _store_data(store: Path) -> dict[str, str]:
    """A digest of every pack, manifest, DiskMap and mark (the records of checks left out)."""
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for top in ("packs", "snapshots")
        for p in sorted((store / top).rglob("*"))
        if p.is_file() and p.name != RECORD
    } | {"config.json": hashlib.sha256((store / "config.json").read_bytes()).hexdigest()}


def test_a_clean_snapshot_passes_every_filesystem_checked_and_nothing_changes(
    lab: Lab, tmp_path: Path
) -> None:
    before = _store_data(lab.store)
    out = ok(
        "snapshots",
        "check",
        lab.clean,
        "--store",
        lab.store,
        "--expect",
        "/sda1/etc/hostname",
        "--expect",
        "/vg0-lv0/var/log",
        "--json",
    )
    record = json.loads(out)
    assert record["outcome"] == "passed", out
    checked = {f["name"]: (f["fstype"], f["state"], f["checker"]) for f in record["filesystems"]}
    assert checked == {
        "sda1": ("ext4", "ok", "e2fsck -f -n"),
        "sda2": ("xfs", "ok", "xfs_repair -n"),
        "sda3": ("ntfs", "ok", "ntfsfix --no-action"),
        "vg0-lv0": ("ext4", "ok", "e2fsck -f -n"),
    }, out
    paths = [(p["path"], p["present"], p["kind"]) for p in record["paths"]]
    assert paths == [("/sda1/etc/hostname", True, "file"), ("/vg0-lv0/var/log", True, "dir")]
    assert record["problems"] == [] and record["snapshot"] == lab.clean
    assert record["disks"] == ["check-vm.raw"]

    line, listed = _listed(lab.store, lab.clean)
    assert f"ok {record['time'][:10]}" in line, line
    assert listed == record

    # the check wrote its record and nothing else
    assert (lab.store / "snapshots" / lab.clean / RECORD).is_file()
    assert _store_data(lab.store) == before
    ok("store", "verify", lab.store, "--data", "--percent", "100")
    ok("restore", lab.clean, "--store", lab.store, "--to", tmp_path / "back.raw", "--format", "raw")
    assert _same_file(tmp_path / "back.raw", lab.image)


def test_a_missing_expected_path_fails_the_check_naming_it(lab: Lab) -> None:
    proc = tessera(
        "snapshots",
        "check",
        lab.clean,
        "--store",
        lab.store,
        "--expect",
        "/sda2/srv/www/index.html",
        "--expect",
        "/sda1/etc/shadow",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "/sda2/srv/www/index.html  present (file)" in lines, proc.stdout
    assert any(s.startswith("/sda1/etc/shadow  MISSING") for s in lines), proc.stdout
    assert "failed: missing /sda1/etc/shadow" in lines[-1], proc.stdout

    line, listed = _listed(lab.store, lab.clean)
    assert "FAILED" in line, line
    assert listed["outcome"] == "failed"
    assert [p["path"] for p in listed["paths"] if not p["present"]] == ["/sda1/etc/shadow"]
    assert all(f["state"] == "ok" for f in listed["filesystems"]), listed


def test_a_damaged_filesystem_fails_the_check_naming_it_and_why(lab: Lab) -> None:
    proc = tessera("snapshots", "check", lab.damaged, "--store", lab.store, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = json.loads(proc.stdout)
    assert record["outcome"] == "failed"
    states = {f["name"]: f["state"] for f in record["filesystems"]}
    assert states == {"sda1": "failed", "sda2": "ok", "sda3": "ok", "vg0-lv0": "ok"}, record
    (sda1,) = [f for f in record["filesystems"] if f["name"] == "sda1"]
    assert sda1["exit_status"] == 4, sda1
    assert sda1["problem"].startswith("e2fsck -f -n: exit 4 (filesystem errors left"), sda1
    assert "bitmap differences" in sda1["output"].lower(), sda1["output"]
    assert record["problems"] == [f"sda1 (ext4): {sda1['problem']}"]

    line, _ = _listed(lab.store, lab.damaged)
    assert "FAILED" in line, line
    text = tessera("snapshots", "--store", lab.store).stdout
    assert f"FAILED {record['time'][:10]}" in text


def test_a_check_that_cannot_boot_its_appliance_is_recorded_as_an_error(lab: Lab) -> None:
    proc = tessera("snapshots", "check", lab.clean, "--store", lab.store, "--launch-timeout", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the appliance did not start within 1 s" in proc.stdout, proc.stdout
    line, listed = _listed(lab.store, lab.clean)
    assert f"ERROR {listed['time'][:10]}" in line, line
    assert listed["outcome"] == "error" and listed["filesystems"] == []
    assert listed["error"].startswith(f"snapshot {lab.clean}: the appliance did not start")


def _cheap_check(store: Path, snapshot: str) -> subprocess.CompletedProcess[str]:
    """A check that boots nothing (its appliance is killed after 1 s): an ``error`` record,
    written as every record is."""
    proc = tessera("snapshots", "check", snapshot, "--store", store, "--launch-timeout", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the appliance did not start within 1 s" in proc.stdout, proc.stdout
    return proc


def _leftovers(store: Path, snapshot: str) -> list[str]:
    return sorted(p.name for p in (store / "snapshots" / snapshot).iterdir() if "check" in p.name)


def _fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s filesystem."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for block in (1 << 20, 4096):
            try:
                while True:
                    f.write(bytes(block))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def _run_module(
    module: str, *args: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m module ARGS`` (a CLI wrapper of ``tests``) as ``tessera`` runs here."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV | (env or {}),
        timeout=300,
        check=False,
    )


def test_a_full_store_filesystem_reports_the_verdict_and_keeps_the_earlier_record(
    lab: Lab, tmp_path: Path
) -> None:
    used = sum(p.stat().st_size for p in lab.store.rglob("*") if p.is_file())
    with tiny_tmpfs(tmp_path / "small", f"{used // MiB + 4}m") as small:
        store = small / "store"
        shutil.copytree(lab.store, store)
        _cheap_check(store, lab.clean)  # the earlier record
        record = store / "snapshots" / lab.clean / RECORD
        earlier = record.read_bytes()
        before = _store_data(store)
        filler = _fill(small)

        proc = tessera(
            "snapshots", "check", lab.clean, "--store", store, "--expect", "/sda1/etc/hostname"
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        # what the check found is reported all the same ...
        lines = proc.stdout.splitlines()
        assert "/sda1/etc/hostname  present (file)" in lines, proc.stdout
        assert ": passed: 4 of 4 filesystems checked" in lines[-1], proc.stdout
        # ... and that it could not be recorded, naming the file and the errno
        assert (
            f"tessera: the check's verdict above was NOT recorded: store {store}: cannot write "
            f"the restore-check record of snapshot {lab.clean} ({record}): "
            "No space left on device (ENOSPC)"
        ) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert record.read_bytes() == earlier
        assert _leftovers(store, lab.clean) == [RECORD]
        assert _store_data(store) == before
        line, listed = _listed(store, lab.clean)
        assert f"ERROR {listed['time'][:10]}" in line  # the earlier record, still whole

        filler.unlink()
        ok("store", "verify", store, "--data", "--percent", "100")


@pytest.mark.parametrize(
    "point", ["mid_write", "before_fsync", "before_rename", "before_dir_fsync"]
)
def test_an_io_error_writing_the_record_is_reported_with_the_verdict(lab: Lab, point: str) -> None:
    _cheap_check(lab.store, lab.damaged)
    record = lab.store / "snapshots" / lab.damaged / RECORD
    earlier = record.read_bytes()
    before = _store_data(lab.store)
    proc = _run_module(
        "tests.faults.fail_cli", f"restore.check_record.{point}", 1, "EIO",
        "--", "snapshots", "check", lab.damaged, "--store", lab.store, "--launch-timeout", 1,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the appliance did not start within 1 s" in proc.stdout, proc.stdout  # the verdict
    assert (
        f"NOT recorded: store {lab.store}: cannot write the restore-check record of snapshot "
        f"{lab.damaged} ({record}): Input/output error (EIO); the device reported an I/O error"
    ) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if point == "before_dir_fsync":  # renamed, not known durable: the new record, whole
        assert json.loads(record.read_bytes())["time"] >= json.loads(earlier)["time"]
    else:
        assert record.read_bytes() == earlier
    assert _leftovers(lab.store, lab.damaged) == [RECORD]
    assert _store_data(lab.store) == before


def test_a_damaged_record_is_listed_unreadable_and_the_next_check_replaces_it(lab: Lab) -> None:
    _cheap_check(lab.store, lab.damaged)
    record = lab.store / "snapshots" / lab.damaged / RECORD
    for damaged in (record.read_bytes()[:60], b'{"snapshot": 1, "secret": "hunter2"}'):
        record.write_bytes(damaged)
        proc = tessera("snapshots", "--store", lab.store)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        (line,) = [s for s in proc.stdout.splitlines() if s.startswith(lab.damaged)]
        assert "UNREADABLE" in line, line
        _, listed = _listed(lab.store, lab.damaged)
        assert listed["outcome"] == "unreadable", listed
        assert listed["error"].startswith(f"{record}: "), listed
        assert "hunter2" not in listed["error"] and "the next check replaces it" in listed["error"]
    _cheap_check(lab.store, lab.damaged)
    line, listed = _listed(lab.store, lab.damaged)
    assert f"ERROR {listed['time'][:10]}" in line, line
    assert _leftovers(lab.store, lab.damaged) == [RECORD]


def test_a_check_killed_before_its_record_is_renamed_leaves_nothing_that_matters(
    lab: Lab,
) -> None:
    _cheap_check(lab.store, lab.damaged)
    record = lab.store / "snapshots" / lab.damaged / RECORD
    earlier = record.read_bytes()
    proc = _run_module(
        "tests.integration.kill_backup", "restore.check_record.before_rename", 1,
        "--", "snapshots", "check", lab.damaged, "--store", lab.store, "--launch-timeout", 1,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert _leftovers(lab.store, lab.damaged) == [RECORD, RECORD + ".tmp"]
    assert record.read_bytes() == earlier  # the tmp is read by nothing
    line, listed = _listed(lab.store, lab.damaged)
    assert f"ERROR {listed['time'][:10]}" in line and json.loads(earlier) == {"format": 1} | listed
    ok("store", "verify", lab.store)
    _cheap_check(lab.store, lab.damaged)  # the next check takes the tmp's name over
    assert _leftovers(lab.store, lab.damaged) == [RECORD]
    assert json.loads(record.read_bytes())["time"] >= listed["time"]


def test_a_check_killed_while_its_appliance_runs_leaves_nothing_behind(lab: Lab) -> None:
    _cheap_check(lab.store, lab.damaged)
    record = lab.store / "snapshots" / lab.damaged / RECORD
    earlier = record.read_bytes()
    before = _store_data(lab.store)
    # its own TMPDIR tells this check's helper and qemu from any other (short: the disks'
    # sockets go there; the appliance cache stays where it is)
    scratch = Path(tempfile.mkdtemp(prefix="tck-", dir="/tmp"))
    try:
        env = {"TMPDIR": str(scratch), "LIBGUESTFS_CACHEDIR": "/var/tmp"}
        proc = _run_module(
            "tests.integration.kill_backup", "restore.check.appliance_up", 1,
            "--", "snapshots", "check", lab.damaged, "--store", lab.store, env=env,
        )  # fmt: skip
        assert proc.returncode == -9, proc.stdout + proc.stderr
        # the helper (a session of its own) sees its requests end, shuts its appliance down
        left = _processes_with(f"TMPDIR={scratch}")
        for pid in left:
            assert _gone(pid, timeout=120), f"pid {pid} outlived the killed check: {left}"
        assert _processes_with(f"TMPDIR={scratch}") == []
        # what stays is the killed CLI's socket directory in its TMPDIR, nothing in the store
        assert [p.name.startswith(APPLIANCE_PREFIX) for p in scratch.iterdir()] == [True]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert record.read_bytes() == earlier
    assert _leftovers(lab.store, lab.damaged) == [RECORD]
    assert _store_data(lab.store) == before
    _cheap_check(lab.store, lab.damaged)
    assert _leftovers(lab.store, lab.damaged) == [RECORD]


def _processes_with(variable: str) -> list[int]:
    """The pids whose environment holds ``variable`` (NAME=VALUE)."""
    found = []
    needle = variable.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ:
                found.append(int(entry.name))
    return found


def _gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` (not a child) ends within ``timeout`` s (a pidfd: woken by its end)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


async def test_a_daemon_check_whose_record_cannot_be_written_ends_failed_saying_both(
    lab: Lab, tmp_path: Path
) -> None:
    _cheap_check(lab.store, lab.damaged)
    record = lab.store / "snapshots" / lab.damaged / RECORD
    earlier = json.loads(record.read_bytes())
    (tmp_path / "pass").write_text("test-pass\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"stores:\n  - name: main\n    path: {lab.store}\n"
        f"    passphrase_file: {tmp_path / 'pass'}\n"
        f"api:\n  socket: {tmp_path / 'api.sock'}\n"
        f"scheduler:\n  state_file: {tmp_path / 'scheduler.json'}\n"
    )
    async with running(config) as service, TestClient(TestServer(build_app(service))) as client:
        with failing(Inject("restore.check_record.before_fsync", 1, "EIO")):
            response = await client.post(
                f"/v1/snapshots/{lab.damaged}/check", json={"launch_timeout": 1}
            )
            assert response.status == 202, await response.text()
            (job,) = (await response.json())["jobs"]
            view = service.jobs.get(job["id"])
            assert view.task is not None
            await view.task
        assert view.state == "failed", view.error
        assert view.error is not None
        assert view.error.startswith(f"error: snapshot {lab.damaged}: the appliance did not start")
        not_saved = (
            f"the check's verdict above was NOT recorded: store {lab.store}: cannot write the "
            f"restore-check record of snapshot {lab.damaged} ({record}): "
            "Input/output error (EIO)"
        )
        assert not_saved in view.error, view.error
        assert any(not_saved in line for line in view.lines), view.lines
        assert view.summary["outcome"] == "error"  # the verdict, kept in the job's history
        doc = await (await client.get(f"/v1/snapshots/{lab.damaged}")).json()
        assert {"format": 1} | doc["check"] == earlier  # the earlier record, whole
    assert _leftovers(lab.store, lab.damaged) == [RECORD]


def _same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
