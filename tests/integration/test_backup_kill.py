"""A backup process killed with SIGKILL mid-transfer: its qemu-nbd dies with it (parent-death
signal), the next start finishes the cleanup (removes the export's directory and the run's
bitmap, marks the job failed), the store verifies clean, and the next backup succeeds and
restores exactly. Also killed between spawning qemu-nbd and recording its pid; a raw image's
backup (read directly) killed the same way leaves nothing to stop."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from plugins.local.source import _qemu_nbd_serving
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TESSERA_PASSPHRASE": "pw"}


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """True as soon as ``check()`` is; False if it is still false after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def tmpdir_env() -> Iterator[Path]:
    """A short private TMPDIR for the CLI (qemu-nbd's tessera-nbd-* directories go there;
    short, because unix socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="tk-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def tessera(
    *args: str | Path,
    kill_at: tuple[str, int] | None = None,
    cwd: Path = ROOT,
    tmpdir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in ``cwd`` (the modules are found from the repository wherever it runs),
    with ``TMPDIR`` set to ``tmpdir`` if given."""
    prefix = ["-m", "engine.cli.main"]
    if kill_at is not None:
        prefix = ["-m", "tests.integration.kill_backup", kill_at[0], str(kill_at[1]), "--"]
    return subprocess.run(
        [sys.executable, *prefix, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": str(ROOT)} | ({"TMPDIR": str(tmpdir)} if tmpdir else {}),
        timeout=300,
        check=False,
    )


def bitmaps(image: Path) -> list[str]:
    info = json.loads(run("qemu-img", "info", "--output=json", "--force-share", image))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


@pytest.mark.parametrize("level", ["full", "incremental"])
def test_sigkill_mid_transfer_then_recover(tmp_path: Path, level: str, tmpdir_env: Path) -> None:
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
        tmpdir=tmpdir_env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    journal = [json.loads(p.read_text()) for p in (store / "journal").glob("*.json")]
    killed = [r for r in journal if r["state"] == "transferring"]
    assert len(killed) == 1
    assert eventually(lambda: not _qemu_nbd_serving(image)), "qemu-nbd outlived its parent"
    assert len(list(tmpdir_env.glob("tessera-nbd-*"))) == 1  # the kernel cannot remove it
    assert len(bitmaps(image)) == len(before) + 1

    proc = tessera("backup", "image", image, "--store", store, "--level", level, tmpdir=tmpdir_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"job {killed[0]['job_id']}" in proc.stderr
    assert "removed export directory" in proc.stderr and "removed bitmap" in proc.stderr
    record = json.loads((store / "journal" / f"{killed[0]['job_id']}.json").read_text())
    assert record["state"] == "failed" and "interrupted" in record["error"]
    assert not _qemu_nbd_serving(image) and not list(tmpdir_env.glob("tessera-nbd-*"))
    assert tessera("store", "verify", store, "--data").returncode == 0

    ref = reference(image, tmp_path / "ref.raw")
    snaps = json.loads(tessera("snapshots", "--store", store, "--json").stdout)
    assert snaps[-1]["level"] == level
    target = tmp_path / "restored.qcow2"
    assert tessera("restore", snaps[-1]["id"], "--store", store, "--to", target).returncode == 0
    assert identical(ref, target)


def test_sigkill_mid_restore_then_recover(tmp_path: Path, tmpdir_env: Path) -> None:
    """A restore killed mid-write leaves a partial image and qemu-nbd's directory (qemu-nbd
    itself dies with its parent); the next start removes both, and the same restore then
    succeeds and is exact."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    assert tessera("backup", "image", image, "--store", store).returncode == 0
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
    target = tmp_path / "restored.qcow2"
    partial = tmp_path / "restored.qcow2.tessera-partial"

    proc = tessera(
        "restore",
        snap,
        "--store",
        store,
        "--to",
        target,
        kill_at=("restore.chunk.written", 5),
        tmpdir=tmpdir_env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert partial.exists() and not target.exists()
    assert eventually(lambda: not _qemu_nbd_serving(partial)), "qemu-nbd outlived its parent"

    proc = tessera("restore", snap, "--store", store, "--to", target, tmpdir=tmpdir_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed partial image" in proc.stderr and "removed export directory" in proc.stderr
    assert not partial.exists() and not _qemu_nbd_serving(partial)
    assert not list(tmpdir_env.glob("tessera-nbd-*"))
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


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_sigkill_between_spawning_qemu_nbd_and_recording_it(
    tmp_path: Path, tmpdir_env: Path, command: str
) -> None:
    """Killed the instant qemu-nbd exists, before its pid is journaled: the export's
    directory was journaled before the spawn, so the next start finds and removes what is
    left; no qemu-nbd keeps the image locked, and the next backup and restore work."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    target, partial = tmp_path / "r.qcow2", tmp_path / "r.qcow2.tessera-partial"
    if command == "backup":
        args: list[str | Path] = ["backup", "image", image, "--store", store]
    else:
        assert tessera("backup", "image", image, "--store", store).returncode == 0
        snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
        args = ["restore", snap, "--store", store, "--to", target]

    proc = tessera(*args, kill_at=("helper.spawned", 1), tmpdir=tmpdir_env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    (killed,) = [
        json.loads(p.read_text())
        for p in (store / "journal").glob("*.json")
        if json.loads(p.read_text())["state"] not in ("succeeded", "failed")
    ]
    assert [e.get("pid") for e in killed["resources"]["exports"]] == [None]

    proc = tessera("backup", "image", image, "--store", store, tmpdir=tmpdir_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed export directory" in proc.stderr
    assert not _qemu_nbd_serving(image) and not _qemu_nbd_serving(partial)
    assert not list(tmpdir_env.glob("tessera-nbd-*")) and not partial.exists()
    assert tessera("store", "verify", store, "--data").returncode == 0

    ref = reference(image, tmp_path / "ref.raw")
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[-1]["id"]
    proc = tessera("restore", snap, "--store", store, "--to", target, tmpdir=tmpdir_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert identical(ref, target)


def test_qemu_nbd_dies_with_its_killed_parent(tmp_path: Path, tmpdir_env: Path) -> None:
    """The parent-death signal alone: nothing runs recovery, yet the qemu-nbd of a SIGKILLed
    backup is gone within seconds and the image can be written again."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=64)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    proc = tessera(
        "backup", "image", image, "--store", store, kill_at=("helper.spawned", 1), tmpdir=tmpdir_env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert eventually(lambda: not _qemu_nbd_serving(image)), "qemu-nbd outlived its parent"
    run("qemu-img", "bitmap", "--add", image, "after-kill")  # takes the write lock


def test_sigkill_mid_raw_backup_leaves_nothing_to_stop(tmp_path: Path, tmpdir_env: Path) -> None:
    """A raw image is read directly: a backup killed mid-transfer journaled no export and
    leaves no process and no directory; the next start only marks the job failed, and the
    next backup restores exactly."""
    store, raw = tmp_path / "store", tmp_path / "vm.raw"
    run("qemu-img", "convert", "-O", "raw", make_fs_qcow2(tmp_path, "vm", size_mib=64), raw)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    args: list[str | Path] = ["backup", "image", raw, "--store", store]
    proc = tessera(*args, kill_at=("pipeline.slot.done", 5), tmpdir=tmpdir_env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    (killed,) = [json.loads(p.read_text()) for p in (store / "journal").glob("*.json")]
    assert killed["state"] == "transferring" and "exports" not in killed["resources"]
    assert not _qemu_nbd_serving(raw) and not list(tmpdir_env.glob("tessera-nbd-*"))

    proc = tessera(*args, tmpdir=tmpdir_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"recovery: job {killed['job_id']}: now failed" in proc.stderr
    assert "export" not in proc.stderr and "qemu-nbd" not in proc.stderr
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[-1]["id"]
    target = tmp_path / "restored.raw"
    assert tessera("restore", snap, "--store", store, "--to", target).returncode == 0
    assert target.read_bytes() == raw.read_bytes()
