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

The appliance runs emulated (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``, see
``test_files.py``); each check is one appliance boot.
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from engine.core.units import MiB
from plugins.lab.guest_disk import PARTITIONS
from tests.cli import Cli
from tests.guest_disks import guest_disk_copy

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


def _same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
