"""What a test may leave behind by mistake (child processes, zombies included), and what
a thread of the test is blocked in, to wait for that instead of sleeping."""

import asyncio
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final


def children() -> set[int]:
    """Pids whose parent is this process, read from /proc (a zombie is listed until reaped)."""
    me = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me:
            found.add(int(entry.name))
    return found


def threads_blocked_in(syscalls: Collection[int] = (), wchan: str | None = None) -> list[int]:
    """Thread ids of this process now in one of the system calls numbered ``syscalls``
    (first field of ``/proc/self/task/*/syscall``) or sleeping in kernel function ``wchan``."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        try:
            if ((task / "syscall").read_text().split()[0] in {str(n) for n in syscalls}) or (
                wchan is not None and (task / "wchan").read_text() == wchan
            ):
                found.append(int(task.name))
        except (OSError, IndexError):
            continue  # the thread ended while we looked
    return found


async def until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` is true, checking every 10 ms; AssertionError naming
    ``what`` after ``timeout`` seconds (a loaded CI machine schedules late)."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


# x86_64 system call numbers of preadv(2): glibc's preadv makes a preadv2 call (327) where
# the kernel has it, else preadv (295).
PREADV: Final = (295, 327)
