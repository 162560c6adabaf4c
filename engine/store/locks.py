"""The store's writer lock: one process at a time may open a store for writing.

Inside that process many jobs share one ``Store`` (it is thread-safe); other processes may
open it read-only at any time (SQLite WAL readers and immutable sealed packs make that safe).
The lock is an ``flock`` on ``STORE/lock``, released by the kernel when the process dies, so
a killed writer never leaves a stale lock. The holder's pid is written into the file for the
error message.
"""

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.core.errors import SnapshotNotFound, StoreLocked
from engine.store.layout import Layout


class WriterLock:
    def __init__(self, store_path: Path):
        self._path = store_path / "lock"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise StoreLocked(path=store_path, reason=_held_by(holder)) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


@contextmanager
def reading_snapshot(layout: Layout, snapshot_id: str) -> Iterator[None]:
    """Share-lock a snapshot while it is read (restore, verify): prune skips a snapshot
    whose manifest someone holds with ``flock(LOCK_SH)`` and says it is in use. Raises
    SnapshotNotFound when the snapshot has no manifest (never committed, or pruned)."""
    path = layout.manifest(snapshot_id)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SnapshotNotFound(snapshot=snapshot_id, reason="no manifest") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # drops the lock


def _held_by(pid: str) -> str:
    """Why the writer lock is refused, naming the holder; when it is the daemon, the way to
    run the command through it instead."""
    try:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        argv = ""
    args = argv.split("\0")
    config = None
    if "run" in args and "--config" in args:
        at = args.index("--config") + 1
        config = args[at] if at < len(args) else None
    if config is not None:
        return (
            f"the Tessera daemon (pid {pid}, `tessera run --config {config}`) holds it; give "
            f"--config {config} instead of the store to go through the daemon (backup vm, "
            "restore, gc, standby refresh), or stop it"
        )
    return f"opened for writing by another process (pid {pid}); stop it or use a read-only command"
