"""Synchronous snapshot write/read helpers for store tests (the async pipeline is separate)."""

import contextlib
import ctypes
import logging
import os
import random
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator, MutableMapping
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from structlog.testing import capture_logs

from engine.core.ids import ZERO_ID
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest


def write_snapshot(
    store: Store,
    vm: str,
    disks: dict[str, bytes],
    level: str = "full",
    config: bytes | None = None,
    time: datetime | None = None,
) -> Manifest:
    """Back up in-memory disks slot by slot through the store's own codec; commit."""
    size = store.config.chunk_size
    with store.begin_snapshot(vm_id=vm, vm_name=vm, level=level, time=time) as snap:
        if config is not None:
            snap.set_config("json", config)
        for disk_id, data in disks.items():
            dm = snap.add_disk(disk_id, disk_id, len(data))
            for slot, start in enumerate(range(0, len(data), size)):
                chunk = data[start : start + size]
                dm.set(slot, ZERO_ID if not any(chunk) else store.put_chunk(chunk))
        return snap.commit()


def read_disk(store: Store, manifest: Manifest, disk_index: int = 0) -> bytes:
    disk = manifest.disks[disk_index]
    out = bytearray()
    with store.open_diskmap(manifest, disk) as dm:
        for slot, chunk_id in dm.iter_ids():
            length = min(dm.chunk_size, disk.size - slot * dm.chunk_size)
            out += bytes(length) if chunk_id == ZERO_ID else store.read_chunk(chunk_id)
    return bytes(out)


def realistic_bytes(size: int, seed: int) -> bytes:
    """Deterministic, compressible, mixed data: text-like runs, zeros and random blocks."""
    rng = random.Random(seed)
    words = [
        bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(400)
    ]
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        if kind < 0.6:
            out += b" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + b"\n"
        elif kind < 0.8:
            out += bytes(rng.randint(1, 8192))
        else:
            out += rng.randbytes(rng.randint(1, 8192))
    return bytes(out[:size])


def sigkill_at(point: str, nth: int) -> Callable[[str], None]:
    """A failpoint handler that SIGKILLs this process at the ``nth`` hit of ``point``."""
    hits = 0

    def handler(name: str) -> None:
        nonlocal hits
        if name == point:
            hits += 1
            if hits == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    return handler


async def backup_with_retries(
    store: Store, source: Any, *, level: str = "full", attempts: int = 4
) -> Any:
    """``run_backup`` of ``source`` into ``store`` with a fast retry policy of ``attempts``
    (tests of read faults); returns the outcome."""
    from engine.jobs.backup import run_backup  # not every user of these helpers runs jobs
    from engine.jobs.journal import Journal
    from engine.util.retry import RetryPolicy
    from engine.workers import make_cpu_pool

    pool = make_cpu_pool(store.keys, store.config.chunk_size, workers=2)
    try:
        return await run_backup(
            store=store,
            pool=pool,
            source=source,
            journal=Journal(store.path / "journal"),
            level=level,
            retry_policy=RetryPolicy(attempts=attempts, base_delay=0.001, max_delay=0.01),
        )
    finally:
        await pool.aclose()


@contextlib.contextmanager
def capture_all_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """``structlog.testing.capture_logs`` at every level. ``capture_logs`` swaps only the
    processors, so a level set by an earlier test in the same worker (a CLI or daemon run
    in-process configures a filtering logger, e.g. at warning) would still drop info
    events before they reach the capture; the configuration is restored after."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)


IN_CREATE = 0x100  # inotify(7)
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)


def wait_created(directory: Path, suffix: str, timeout: float) -> str | None:
    """The name of a file ending in ``suffix`` that is or comes to be in ``directory``
    (inotify: woken by the creation itself, no polling); None after ``timeout`` seconds."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if libc.inotify_add_watch(fd, os.fsencode(directory), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        there = [n for n in os.listdir(directory) if n.endswith(suffix)]
        if there:
            return there[0]
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                return None
            data, at = os.read(fd, 65536), 0
            while at < len(data):
                _, _, _, length = _INOTIFY_EVENT.unpack_from(data, at)
                start = at + _INOTIFY_EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode()
                if name.endswith(suffix):
                    return name
                at = start + length
        return None
    finally:
        os.close(fd)
