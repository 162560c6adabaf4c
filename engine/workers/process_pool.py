"""``ProcessCpuPool``: CPU work in worker processes, buffers in one shared memory arena.

The parent creates the arena (``multiprocessing.shared_memory``) and unlinks it in
``aclose()``. Workers are started with ``spawn`` and attach the arena by name in their
initializer, where each also builds its own ``Codec`` from the key bytes it is given once.
A task carries only a slot index, lengths, a 32-byte id and (for decode) the pack name and
offset; payloads never cross the pipe. Errors raised in a worker (``CorruptRecord`` …) are
``EngineError``s, which pickle intact, and are re-raised in the caller.

Dead workers: if a worker process dies (killed, out of memory, a crash in native code), the
executor is broken for every task it holds. The pool starts a new executor once per broken
one, and each affected call raises ``WorkerError``; later calls run on the new workers::

    task A ─┐                    ┌─ BrokenProcessPool ─→ restart (generation g → g+1) ─→ WorkerError
    task B ─┼─ executor g dies ──┼─ BrokenProcessPool ─→ (already g+1: no restart)  ─→ WorkerError
    task C ─┘                    └─ BrokenProcessPool ─→ (already g+1: no restart)  ─→ WorkerError
    task D ───────────────────────── submitted to g+1 ───────────────────────────────→ result

Resource tracking: workers do *not* unregister the segment from the resource tracker. With
``spawn`` (and ``forkserver``) a worker shares its parent's tracker, whose registry is a set:
a worker's registration of the same name is a no-op, while an unregistration would drop the
parent's entry, so the parent's ``unlink`` would make the tracker print a ``KeyError`` and a
crashed parent's segment would no longer be cleaned up.
"""

import asyncio
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final, TypeVar

from engine.core.errors import ConfigError, WorkerError
from engine.core.ids import ChunkId, short
from engine.store.codec import Codec
from engine.store.keys import StoreKeys
from engine.store.layout import DEFAULT_ZSTD_LEVEL
from engine.workers.pool import (
    ArenaLayout,
    BufferArena,
    ChunkBuffer,
    Fetch,
    Ingested,
    Known,
    Put,
    check_chunk_id,
    check_sizes,
    decode_into,
    default_capacity,
)

T = TypeVar("T")

# Never "fork": the parent runs an event loop and other threads, and a forked child inherits
# whatever locks those threads held. "spawn" costs ~0.2 s per worker (a fresh interpreter
# importing the codec libraries), paid when a worker first starts and after a crash.
START_METHOD: Final = "spawn"
# A task takes milliseconds; workers still busy after this long are stuck, and closing the
# pool must not hang the daemon's shutdown behind them (they are killed instead).
SHUTDOWN_TIMEOUT: Final = 30.0


class ProcessCpuPool:
    """A ``CpuPool`` whose workers are processes sharing one arena (see ``engine.workers``).

    Beyond the protocol: ``arena_name`` (the shared memory segment), ``restarts`` (how often
    a dead worker forced a new executor) and ``worker_pids()``.
    """

    def __init__(
        self,
        keys: StoreKeys,
        chunk_size: int,
        *,
        workers: int | None = None,
        capacity: int | None = None,
        level: int = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        self.workers = workers if workers is not None else os.cpu_count() or 1
        self.capacity = capacity if capacity is not None else default_capacity(self.workers)
        self.chunk_size = chunk_size
        check_sizes(chunk_size, self.workers, self.capacity)
        layout = ArenaLayout(chunk_size, self.capacity)
        self._shm = _create_arena(layout.total)
        self.arena_name = self._shm.name
        assert self._shm.buf is not None  # None only after close()
        self._arena = BufferArena(self._shm.buf, layout)
        # Sent once per worker start; tasks carry no key material.
        self._initargs = (
            self.arena_name,
            layout,
            (keys.id_key, keys.mac_key, keys.data_key),
            level,
        )
        self._executor = self._new_executor()
        self._generation = 0
        self._retired: list[ProcessPoolExecutor] = []
        self._putter = ThreadPoolExecutor(1, thread_name_prefix="tessera-put")
        # a restore's record reads (``fetch_decode``): blocking preads, several at once
        self._fetcher = ThreadPoolExecutor(self.workers, thread_name_prefix="tessera-fetch")
        self.restarts = 0

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context(START_METHOD),
            initializer=_init_worker,
            initargs=self._initargs,
        )

    def worker_pids(self) -> list[int]:
        """Pids of the current executor's worker processes (started on demand)."""
        # ProcessPoolExecutor keeps its processes in ``_processes`` (pid → Process); it has
        # no public accessor, and metrics and crash tests need the pids.
        processes: dict[int, Any] = getattr(self._executor, "_processes", None) or {}
        return list(processes)

    def buffer(self) -> contextlib.AbstractAsyncContextManager[ChunkBuffer]:
        self._arena.check_open()
        return self._arena.hold()

    async def chunk_id(self, buf: ChunkBuffer) -> ChunkId:
        self._arena.check(buf)
        length = _length(buf.length, self.chunk_size, "length")
        digest = await self._call(buf, "hashing a chunk", _hash_task, buf.slot, length)
        return ChunkId(digest)

    async def encode(self, buf: ChunkBuffer, chunk_id: ChunkId) -> memoryview:
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        length = _length(buf.length, self.chunk_size, "length")
        buf.record_length = 0
        buf.record_length = await self._call(
            buf,
            f"encoding chunk {short(chunk_id)}",
            _encode_task,
            buf.slot,
            length,
            bytes(chunk_id),
        )
        return buf.record_data

    async def ingest(self, buf: ChunkBuffer, known: Known, put: Put) -> Ingested:
        # Hash and encode in a worker process; ``known`` on the loop; ``put`` on a thread
        # of this process, tracked as the buffer's task so a cancelled call keeps the buffer
        # out of circulation until the put has stopped reading its record.
        chunk_id = await self.chunk_id(buf)
        if known(chunk_id):
            buf.record_length = 0
            return Ingested(chunk_id, 0, False)
        record = await self.encode(buf, chunk_id)
        written = await self._arena.run(buf, lambda: self._putter.submit(put, chunk_id, record))
        return Ingested(chunk_id, len(record), written)

    async def decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, pack: str = "?", offset: int = 0
    ) -> memoryview:
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        record_length = _length(buf.record_length, self._arena.layout.record_size, "record_length")
        buf.length = 0
        buf.length = await self._call(
            buf,
            f"decoding chunk {short(chunk_id)} from pack {pack} at offset {offset}",
            _decode_task,
            buf.slot,
            record_length,
            bytes(chunk_id),
            pack,
            offset,
        )
        return buf.data

    async def fetch_decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, fetch: Fetch
    ) -> tuple[memoryview, str, int]:
        # ``fetch`` on a thread of this process (the store is open here), tracked as the
        # buffer's task like ``put``; then the decode in a worker process.
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        record = buf.record
        buf.length = buf.record_length = 0
        n, pack, offset = await self._arena.run(buf, lambda: self._fetcher.submit(fetch, record))
        buf.record_length = n
        return await self.decode(buf, chunk_id, pack, offset), pack, offset

    async def _call(self, buf: ChunkBuffer, task: str, fn: Callable[..., T], *args: object) -> T:
        executor, generation = self._executor, self._generation
        try:
            return await self._arena.run(buf, lambda: executor.submit(fn, *args))
        except BrokenProcessPool as e:
            self._restart(generation)
            raise WorkerError(
                task=task,
                reason=f"worker process died (BrokenProcessPool: {e}); the pool was restarted",
            ) from e

    def _restart(self, generation: int) -> None:
        # Runs on the event loop thread and never awaits, so it is atomic with respect to the
        # other tasks (no lock needed): the first task to see executor ``generation`` broken
        # replaces it; the tasks that fail with it afterwards find a newer generation.
        if generation != self._generation or self._arena.closed:
            return
        broken = self._executor
        self._executor = self._new_executor()
        self._generation += 1
        self.restarts += 1
        # The broken executor has already failed its futures and terminated its workers;
        # it is joined (off the loop) in aclose().
        broken.shutdown(wait=False, cancel_futures=True)
        self._retired.append(broken)

    async def aclose(self) -> None:
        """Let submitted tasks finish, stop the workers, then unlink and unmap the arena.
        Idempotent.

        Workers still busy after ``SHUTDOWN_TIMEOUT`` are killed and WorkerError is raised
        (the arena is released all the same). BufferError if a caller still holds a slice of
        a buffer (ownership rule 4 in ``engine.workers``); the arena is unlinked regardless."""
        if self._arena.closed:
            return
        self._arena.close()
        executors: list[Executor] = [*self._retired, self._executor, self._putter, self._fetcher]
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await asyncio.to_thread(_shutdown_all, executors)
        except TimeoutError:
            for executor in executors:
                processes: dict[int, Any] = getattr(executor, "_processes", None) or {}
                for pid in list(processes):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            raise WorkerError(
                task="stopping the pool",
                reason=f"workers still busy after {SHUTDOWN_TIMEOUT:.0f} s were killed",
            ) from None
        finally:
            self._arena.release_views()
            self._shm.unlink()
            self._shm.close()


def _create_arena(size: int) -> SharedMemory:
    """Create the shared memory segment and allocate its pages now: a full /dev/shm (containers
    default to 64 MiB) is then a ConfigError here, not a SIGBUS in whichever process first
    touches a page that cannot be backed."""
    try:
        shm = SharedMemory(create=True, size=size)
    except OSError as e:
        raise _no_room(size, e) from e
    fd = getattr(shm, "_fd", -1)  # SharedMemory keeps its descriptor private (POSIX only)
    if fd >= 0:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            shm.unlink()
            shm.close()
            raise _no_room(size, e) from e
    return shm


def _no_room(size: int, e: OSError) -> ConfigError:
    return ConfigError(
        message=f"cannot reserve {size} bytes of shared memory for the CPU pool's buffers "
        f"({e.strerror}); enlarge /dev/shm, lower the pool capacity or use the thread pool"
    )


def _shutdown_all(executors: list[Executor]) -> None:
    # Tasks already submitted finish normally (cancelling them would surface as an unasked-for
    # CancelledError in their callers); no new ones can be submitted once the arena is closed.
    for executor in executors:
        executor.shutdown(wait=True)


def _length(n: int, limit: int, name: str) -> int:
    if not 0 <= n <= limit:
        raise ValueError(f"ChunkBuffer.{name} = {n} is outside 0..{limit}")
    return n


# --- worker process side ------------------------------------------------------------------


class _Worker:
    """What a worker process holds: the attached arena, its layout and its own Codec."""

    def __init__(self, shm: SharedMemory, layout: ArenaLayout, codec: Codec) -> None:
        assert shm.buf is not None  # None only after close()
        self.shm = shm  # keeps the mapping alive for the life of the process
        self.buf = shm.buf
        self.layout = layout
        self.codec = codec

    def plain(self, slot: int, length: int) -> memoryview:
        start = self.layout.plain_offset(slot)
        return self.buf[start : start + length]

    def record(self, slot: int, length: int) -> memoryview:
        start = self.layout.record_offset(slot)
        return self.buf[start : start + length]


_worker: _Worker | None = None


def _init_worker(
    arena_name: str, layout: ArenaLayout, key_bytes: tuple[bytes, bytes, bytes | None], level: int
) -> None:
    global _worker
    # Ctrl-C reaches the whole process group; the parent decides how to stop its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    id_key, mac_key, data_key = key_bytes
    keys = StoreKeys(id_key=id_key, mac_key=mac_key, data_key=data_key)
    _worker = _Worker(SharedMemory(name=arena_name), layout, Codec(keys, level))


def _state() -> _Worker:
    if _worker is None:
        raise RuntimeError("CpuPool worker used before its initializer ran")
    return _worker


# Views are released on return (``with``) so the arena can be unmapped cleanly at exit.


def _hash_task(slot: int, length: int) -> bytes:
    w = _state()
    with w.plain(slot, length) as plain:
        return w.codec.chunk_id(plain)


def _encode_task(slot: int, length: int, chunk_id: bytes) -> int:
    w = _state()
    with w.plain(slot, length) as plain, w.record(slot, w.layout.record_size) as out:
        return w.codec.encode_into(plain, ChunkId(chunk_id), out)


def _decode_task(slot: int, record_length: int, chunk_id: bytes, pack: str, offset: int) -> int:
    w = _state()
    with w.record(slot, record_length) as record, w.plain(slot, w.layout.chunk_size) as out:
        return decode_into(w.codec, record, out, ChunkId(chunk_id), pack=pack, offset=offset)
