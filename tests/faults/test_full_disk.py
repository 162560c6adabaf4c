"""A real full disk: the store on a small tmpfs, filled by another file between backups.

From the CLI: the backup that meets the full disk fails with exit 1 and one line naming the
store, the pack and ENOSPC (no traceback); once space is freed the next backup succeeds, and
every committed snapshot restores byte-identical, the next open drops nothing and a data
verify is clean. Inside a running daemon the same holds without a restart: the daemon keeps
the store open across the failure and its next backup succeeds (``test_daemon_full_disk``).
"""

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.cli import Cli
from tests.e2e.test_daemon import ENV as DAEMON_ENV
from tests.e2e.test_daemon import (
    Daemon,
    lab,  # noqa: F401 - the fixture
    wait_jobs,
)
from tests.e2e.test_daemon import tessera as atessera
from tests.faults.harness import record_case
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference

pytestmark = pytest.mark.integration

ENV = {**os.environ, "TESSERA_PASSPHRASE": "full-disk"}
CLI = Cli(passphrase="full-disk")
tessera = CLI.run


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small real filesystem at ``path`` (root only: the tests run as root, as CI does)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` until only ``leave`` bytes are free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    with filler.open("wb") as f:
        remaining = max(0, free - leave)
        block = b"\xa5" * (1 << 20)
        while remaining > 0:
            n = f.write(block[: min(len(block), remaining)])
            remaining -= n
    return filler


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", "96m") as fs:
        yield fs


def test_cli_full_disk_then_freed(tmp_path: Path, small_fs: Path) -> None:
    store = small_fs / "store"
    image = make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    first = tessera("backup", "image", image, "--store", store)
    assert first.returncode == 0, first.stderr
    refs = [reference(image, tmp_path / "ref-0.raw")]

    # another VM: data the store does not hold, and no room for it
    other = make_fs_qcow2(tmp_path, "other", size_mib=64, seed=2)
    filler = fill(small_fs, leave=256 * 1024)
    failed = tessera("backup", "image", other, "--store", store)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    assert str(store) in failed.stderr and "ENOSPC" in failed.stderr, failed.stderr
    assert "free on its filesystem" in failed.stderr

    filler.unlink()
    again = tessera("backup", "image", other, "--store", store)
    assert again.returncode == 0, again.stderr
    assert "dropped index entries" not in again.stderr and "unreadable pack" not in again.stderr
    refs.append(reference(other, tmp_path / "ref-1.raw"))
    qemu_io(image, "write -P 0x61 1M 6M")  # and the first VM goes on: an incremental
    third = tessera("backup", "image", image, "--store", store)
    assert third.returncode == 0, third.stderr
    refs.append(reference(image, tmp_path / "ref-2.raw"))

    snaps = json.loads(tessera("snapshots", "--store", store, "--json").stdout)
    assert len(snaps) == 3  # the failed backup is no restore point
    lost = 0
    snaps.sort(key=lambda s: s["time"])
    for n, (snap, ref) in enumerate(zip(snaps, refs, strict=True)):
        target = tmp_path / f"restored-{n}.qcow2"
        proc = tessera("restore", snap["id"], "--store", store, "--to", target)
        lost += proc.returncode != 0 or not identical(ref, target)
    verify = tessera("store", "verify", store, "--data")
    record_case(
        "real full disk (CLI)",
        "tmpfs ENOSPC mid-backup",
        detected=int(failed.returncode == 1),
        lost=lost,
        undetected=int(verify.returncode != 0),
        committed=len(snaps),
    )
    assert lost == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not list((store / "packs" / "tmp").iterdir()), "an abandoned pack was left behind"


@pytest.fixture
def store_fs(tmp_path: Path) -> Iterator[Path]:
    """The lab fixture's store directory as a small tmpfs of its own (requested first)."""
    with tmpfs(tmp_path / "store", "320m") as fs:
        yield fs


async def test_daemon_full_disk(
    tmp_path: Path,
    store_fs: Path,
    lab: tuple[FakeEngine, Path],  # noqa: F811 - the imported fixture
) -> None:
    """One daemon, never restarted: a backup fails on the full store, the next succeeds."""
    _engine, config = lab
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await atessera("backup", "vm", "web01", "--config", config, "--level", "full")
        assert code == 0, out
        filler = fill(store_fs, leave=256 * 1024)
        code, failed = await atessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code != 0, failed
        assert "ENOSPC" in failed and str(store_fs) in failed, failed
        assert "Traceback" not in failed
        filler.unlink()
        code, out = await atessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code == 0, out
        code, out = await atessera("backup", "vm", "web01", "--config", config)
        assert code == 0, out
        jobs = await wait_jobs(config, 4)
        assert [j["state"] for j in jobs] == ["succeeded", "failed", "succeeded", "succeeded"]
        code, out = await atessera("snapshots", "--config", config, "--json")
        assert code == 0, out
        snaps = json.loads(out)
    finally:
        code = await daemon.stop()
        await daemon.kill()
    assert code == 0, daemon.log.read_text()
    log = daemon.log.read_text()
    assert "dropped index entries" not in log and "CRC32 mismatch" not in log
    assert len(snaps) == 3
    # after the daemon: every committed snapshot restores identical to the lab's disk
    lost = 0
    for n, snap in enumerate(snaps):
        source = tmp_path / f"{snap['vm']['name']}_os.qcow2"
        target = tmp_path / f"restored-{n}.raw"
        proc = tessera("restore", snap["id"], "--store", store_fs, "--to", target, env=DAEMON_ENV)
        assert proc.returncode == 0, proc.stderr
        lost += not identical(source, target)
    verify = tessera("store", "verify", store_fs, "--data", env=DAEMON_ENV)
    record_case(
        "real full disk (daemon)",
        "tmpfs ENOSPC in a running daemon",
        detected=1,
        lost=lost,
        undetected=int(verify.returncode != 0),
        committed=len(snaps),
    )
    assert lost == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr
