"""A backup process killed with SIGKILL mid-transfer: the next start finishes the cleanup
(stops the orphaned qemu-nbd, removes the run's bitmap, marks the job failed), the store
verifies clean, and the next backup succeeds and restores exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.local.source import _qemu_nbd_serving
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TESSERA_PASSPHRASE": "pw"}


def tessera(
    *args: str | Path, kill_at: tuple[str, int] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in ``cwd`` (the modules are found from the repository wherever it runs)."""
    prefix = ["-m", "engine.daemon.cli"]
    if kill_at is not None:
        prefix = ["-m", "tests.integration.kill_backup", kill_at[0], str(kill_at[1]), "--"]
    return subprocess.run(
        [sys.executable, *prefix, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(ROOT)},
        timeout=300,
        check=False,
    )


def bitmaps(image: Path) -> list[str]:
    info = json.loads(run("qemu-img", "info", "--output=json", "--force-share", image))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


@pytest.mark.parametrize("level", ["full", "incremental"])
def test_sigkill_mid_transfer_then_recover(tmp_path: Path, level: str) -> None:
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    if level == "incremental":
        assert tessera("backup", "image", image, "--store", store).returncode == 0
        qemu_io(image, "write -P 0x61 1M 2M", "write -P 0x62 20M 4M")
    before = bitmaps(image)

    proc = tessera(
        "backup",
        "image",
        image,
        "--store",
        store,
        "--level",
        level,
        kill_at=("pipeline.slot.done", 5),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    journal = [json.loads(p.read_text()) for p in (store / "journal").glob("*.json")]
    killed = [r for r in journal if r["state"] == "transferring"]
    assert len(killed) == 1
    assert _qemu_nbd_serving(image), "the killed process left its qemu-nbd behind"
    assert len(bitmaps(image)) == len(before) + 1

    proc = tessera("backup", "image", image, "--store", store, "--level", level)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"job {killed[0]['job_id']}" in proc.stderr
    assert "stopped qemu-nbd" in proc.stderr and "removed bitmap" in proc.stderr
    record = json.loads((store / "journal" / f"{killed[0]['job_id']}.json").read_text())
    assert record["state"] == "failed" and "interrupted" in record["error"]
    assert not _qemu_nbd_serving(image)
    assert tessera("store", "verify", store, "--data").returncode == 0

    ref = reference(image, tmp_path / "ref.raw")
    snaps = json.loads(tessera("snapshots", "--store", store, "--json").stdout)
    assert snaps[-1]["level"] == level
    target = tmp_path / "restored.qcow2"
    assert tessera("restore", snaps[-1]["id"], "--store", store, "--to", target).returncode == 0
    assert identical(ref, target)


def test_sigkill_mid_restore_then_recover(tmp_path: Path) -> None:
    """A restore killed mid-write leaves a partial image and its qemu-nbd; the next start
    removes both, and the same restore then succeeds and is exact."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    assert tessera("backup", "image", image, "--store", store).returncode == 0
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
    target = tmp_path / "restored.qcow2"
    partial = tmp_path / "restored.qcow2.tessera-partial"

    proc = tessera(
        "restore", snap, "--store", store, "--to", target, kill_at=("restore.chunk.written", 5)
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert partial.exists() and not target.exists()
    assert _qemu_nbd_serving(partial), "the killed restore left its qemu-nbd behind"

    proc = tessera("restore", snap, "--store", store, "--to", target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed partial image" in proc.stderr and "stopped qemu-nbd" in proc.stderr
    assert not partial.exists() and not _qemu_nbd_serving(partial)
    assert identical(image, target)


def test_killed_restore_to_a_relative_path_is_recovered_from_elsewhere(tmp_path: Path) -> None:
    """The journal names the partial image by its absolute path: a restore killed in A with
    ``--to disk.qcow2`` is cleaned up by the next command run in B, and the name is free."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    assert tessera("backup", "image", image, "--store", store).returncode == 0
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    partial = a / "disk.qcow2.tessera-partial"

    killed = tessera(
        "restore",
        snap,
        "--store",
        store,
        "--to",
        "disk.qcow2",
        kill_at=("restore.chunk.written", 3),
        cwd=a,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert partial.exists()

    listed = tessera("store", "verify", store, cwd=b)  # read-only: no recovery yet
    assert listed.returncode == 0, listed.stdout + listed.stderr
    again = tessera("restore", snap, "--store", store, "--to", "disk.qcow2", cwd=b)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"removed partial image {partial}" in again.stderr
    assert not partial.exists() and not _qemu_nbd_serving(partial)
    assert identical(image, b / "disk.qcow2")

    rerun = tessera("restore", snap, "--store", store, "--to", "disk.qcow2", cwd=a)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert identical(image, a / "disk.qcow2")
