"""The appliance's qemu, orphaned by a helper that died, is ended with the tree: killed, and
waited for until it has exited; a pid that is no longer a qemu is left alone."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

from engine.restore.files import _end_orphan


def _orphan(exe: Path) -> int:
    """Start ``exe 600`` through a shell that exits at once: it is reparented, not our
    child, as the appliance's qemu is once its helper is killed."""
    out = subprocess.run(
        ["sh", "-c", f'"{exe}" 600 >/dev/null 2>&1 & echo $!'],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout)


def _state(pid: int) -> str | None:
    """The process's state letter, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def test_an_orphaned_qemu_has_exited_when_the_end_returns(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    shutil.copy("/bin/sleep", fake)
    pid = _orphan(fake)
    assert _state(pid) not in (None, "Z")
    asyncio.run(_end_orphan(pid))
    assert _state(pid) in (None, "Z"), "the qemu was still running after its end"


def test_a_pid_that_is_no_qemu_is_left_alone(tmp_path: Path) -> None:
    pid = _orphan(Path(shutil.which("sleep") or "/bin/sleep"))
    try:
        asyncio.run(_end_orphan(pid))
        assert _state(pid) not in (None, "Z"), "a process that is not a qemu was killed"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_pid_already_gone_is_no_error() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    asyncio.run(_end_orphan(proc.pid))
