"""What a test may leave behind by mistake: child processes, zombies included."""

import os
from pathlib import Path


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
