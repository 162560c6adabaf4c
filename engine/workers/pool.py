"""The ``CpuPool`` seam, its ``ChunkBuffer`` and the buffer arena both implementations share.

A pool owns ``capacity`` preallocated slots in one arena (a bytearray for threads, a shared
memory segment for processes). Each slot has a *plain* region (``chunk_size`` bytes) and a
*record* region (``format.max_record_size(chunk_size)`` bytes), both starting at multiples of
4 KiB from the arena's start (page-aligned in the process pool's shared memory; the thread
pool's bytearray itself is not page-aligned, so its buffers are not)::

    arena:  | slot 0: plain | record | slot 1: plain | record | ... | slot capacity-1 ... |

``pool.buffer()`` hands out one slot wrapped in a fresh ``ChunkBuffer``; leaving the
``async with`` gives it back. The views a ``ChunkBuffer`` hands out (``plain``, ``record``,
``data``, ``record_data`` and what ``encode``/``decode`` return) are released when the buffer
is given back, so a stale view raises ``ValueError`` instead of showing another holder's
bytes. Slices a caller cuts from them itself cannot be revoked: they must not outlive the
``async with``. If a call is cancelled while a worker still uses the slot, the slot returns
to circulation only when the worker has finished with it.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from engine.core.ids import CHUNK_ID_SIZE, ChunkId
from engine.store import format as fmt
from engine.store.codec import Buffer, Codec
from engine.util.inbox import Inbox

T = TypeVar("T")

# Slots start at page multiples from the arena's start (page boundaries when the arena is, as
# shared memory is): O_DIRECT would need aligned buffers, and workers
# writing neighbouring slots never touch the same page.
SLOT_ALIGN: Final = 4096
# Per worker: one buffer being processed, one queued behind it so the worker never idles
# between tasks, and two the event loop is filling (reads) or draining (pack writes).
BUFFERS_PER_WORKER: Final = 4
# Even a one- or two-core host needs enough buffers to overlap disk and network I/O with CPU.
MIN_CAPACITY: Final = 8


def default_capacity(workers: int) -> int:
    return max(MIN_CAPACITY, BUFFERS_PER_WORKER * workers)


def check_sizes(chunk_size: int, workers: int, capacity: int) -> None:
    """Raise ValueError for sizes no pool can be built with."""
    if not 0 < chunk_size <= fmt.MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is not in 1..{fmt.MAX_CHUNK_SIZE}")
    if workers < 1:
        raise ValueError(f"a CpuPool needs at least one worker, not {workers}")
    if capacity < 1:
        raise ValueError(f"a CpuPool needs at least one buffer, not {capacity}")


def _align(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


@dataclass(frozen=True)
class ArenaLayout:
    """Where each slot's regions sit in the arena (the parent and every worker agree)."""

    chunk_size: int
    capacity: int

    @property
    def record_size(self) -> int:
        return fmt.max_record_size(self.chunk_size)

    @property
    def stride(self) -> int:
        return _align(self.chunk_size) + _align(self.record_size)

    @property
    def total(self) -> int:
        return self.stride * self.capacity

    def plain_offset(self, slot: int) -> int:
        return slot * self.stride

    def record_offset(self, slot: int) -> int:
        return slot * self.stride + _align(self.chunk_size)


class ChunkBuffer:
    """One slot of a pool's buffer arena, owned by whoever holds it inside ``pool.buffer()``.

    A producer either calls ``load``/``load_record`` or writes into ``plain``/``record``
    directly (e.g. ``sock.recv_into(buf.plain)``) and sets ``length``/``record_length``.
    Every view this object gives out is released when the buffer is given back.
    """

    __slots__ = ("_views", "length", "plain", "record", "record_length", "slot")

    def __init__(self, slot: int, plain: memoryview, record: memoryview) -> None:
        self.slot = slot  # index in the arena: all that crosses to a worker process
        self.plain = plain
        self.record = record
        self.length = 0
        self.record_length = 0
        self._views = [plain, record]

    def load(self, data: Buffer) -> None:
        """Copy plaintext in and set ``length``; ValueError if it exceeds the chunk size."""
        self.length = self._copy_in(self.plain, data, "plaintext")

    def load_record(self, rec: Buffer) -> None:
        """Copy a record in and set ``record_length``; ValueError if it cannot fit."""
        self.record_length = self._copy_in(self.record, rec, "record")

    @property
    def data(self) -> memoryview:
        """``plain[:length]``: the plaintext in use."""
        return self._view(self.plain, self.length, "length")

    @property
    def record_data(self) -> memoryview:
        """``record[:record_length]``: the record in use."""
        return self._view(self.record, self.record_length, "record_length")

    @staticmethod
    def _copy_in(region: memoryview, src: Buffer, what: str) -> int:
        with memoryview(src) as view, view.cast("B") as flat:
            n = flat.nbytes
            if n > region.nbytes:
                raise ValueError(f"{what} of {n} bytes does not fit a {region.nbytes}-byte buffer")
            region[:n] = flat
        return n

    def _view(self, region: memoryview, n: int, name: str) -> memoryview:
        if not 0 <= n <= region.nbytes:
            raise ValueError(f"ChunkBuffer.{name} = {n} is outside 0..{region.nbytes}")
        view = region[:n]
        self._views.append(view)
        return view

    def _release(self) -> None:
        for view in reversed(self._views):
            # A view that someone still exports (e.g. a pending recv_into) cannot be
            # released; it dies with its last user. Everything else is revoked now.
            with contextlib.suppress(BufferError):
                view.release()
        self._views.clear()


Known = Callable[[ChunkId], bool]  # is this chunk stored already (or not to be stored)?
Put = Callable[[ChunkId, memoryview], bool]  # store a record; True if it was written
# Read a chunk's record into the view given: (its length, the pack and offset it was read at).
Fetch = Callable[[memoryview], tuple[int, str, int]]


@dataclass(frozen=True, slots=True)
class Ingested:
    """What ``CpuPool.ingest`` did with one chunk."""

    chunk_id: ChunkId
    record_length: int  # 0 when ``known`` said it is stored: nothing was encoded
    written: bool  # ``put`` wrote the record (False: known, or put found it stored)


def ingest_in_thread(
    codec: Codec, data: Buffer, out: memoryview, known: Known, put: Put
) -> Ingested:
    """``ingest``'s work in one call, for a worker thread."""
    chunk_id = codec.chunk_id(data)
    if known(chunk_id):
        return Ingested(chunk_id, 0, False)
    n = codec.encode_into(data, chunk_id, out)
    record = out[:n]
    try:
        return Ingested(chunk_id, n, put(chunk_id, record))
    finally:
        record.release()


def fetch_decode_in_thread(
    codec: Codec, fetch: Fetch, record: memoryview, out: memoryview, chunk_id: ChunkId
) -> tuple[int, int, str, int]:
    """``fetch_decode``'s work in one call, for a worker thread: (record length, plaintext
    length, pack, offset)."""
    n, pack, offset = fetch(record)
    data = record[:n]
    try:
        return n, codec.decode_into(data, out, chunk_id, pack, offset), pack, offset
    finally:
        data.release()


class CpuPool(Protocol):
    """Runs chunk CPU work (hash, compress, encrypt and the reverse) off the event loop.

    All methods are called from the event loop that created the pool. ``chunk_id``,
    ``encode`` and ``decode`` take a buffer the caller holds (from ``buffer()``) and may run
    concurrently on different buffers, never two at once on the same buffer.
    """

    chunk_size: int
    capacity: int  # buffers that can be in flight at once

    def buffer(self) -> contextlib.AbstractAsyncContextManager[ChunkBuffer]:
        """Hold one buffer; waits while all are held, gives it back on exit."""
        ...

    async def chunk_id(self, buf: ChunkBuffer) -> ChunkId:
        """Keyed BLAKE3 of ``buf.data`` (``Codec.chunk_id``)."""
        ...

    async def encode(self, buf: ChunkBuffer, chunk_id: ChunkId) -> memoryview:
        """Encode ``buf.data`` into ``buf.record`` (verified), set ``record_length`` and
        return ``buf.record_data``."""
        ...

    async def ingest(self, buf: ChunkBuffer, known: Known, put: Put) -> Ingested:
        """A backup's whole CPU path for one chunk in as few hand-offs as the pool allows:
        the id of ``buf.data``; then, unless ``known(id)``, encode it into ``buf.record``
        (``record_length`` set) and ``put(id, record)``. ``known`` and ``put`` may run on a
        worker thread (the thread pool does all of it in one hand-off), so both must be
        thread-safe, as ``Store.has`` and ``Store.put`` are; the record view ``put`` gets is
        valid only during the call. Errors of ``put`` (a full disk) propagate as raised."""
        ...

    async def decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, pack: str = "?", offset: int = 0
    ) -> memoryview:
        """Decode ``buf.record_data`` into ``buf.plain``, set ``length`` and return
        ``buf.data``; raises CorruptRecord naming chunk, pack and offset."""
        ...

    async def fetch_decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, fetch: Fetch
    ) -> tuple[memoryview, str, int]:
        """A restore's whole path for one chunk in as few hand-offs as the pool allows:
        ``fetch(buf.record)`` reads the record (``record_length`` is set from what it
        returns), then it is decoded as ``decode`` does; returns ``(buf.data, pack, offset)``
        with where ``fetch`` read it. ``fetch`` may run on a worker thread (the thread pool
        does all of it in one hand-off), so it must be thread-safe, as
        ``Store.get_record_into`` is, and it may still be running when a cancelled call has
        returned. What ``fetch`` raises (``ChunkMissing``) propagates as raised."""
        ...

    async def aclose(self) -> None:
        """Stop the workers and release the arena; later calls raise RuntimeError."""
        ...


def check_chunk_id(chunk_id: bytes) -> None:
    if len(chunk_id) != CHUNK_ID_SIZE:
        raise ValueError(f"a chunk id has {CHUNK_ID_SIZE} bytes, not {len(chunk_id)}")


def decode_into(
    codec: Codec, record: Buffer, out: memoryview, chunk_id: ChunkId, *, pack: str, offset: int
) -> int:
    """Decode ``record`` (fully verified by the codec) into ``out``; returns the length.

    Raises ValueError when the chunk is larger than this pool's buffers."""
    return codec.decode_into(record, out, chunk_id, pack, offset)


class BufferArena:
    """The slots of one pool: hands out ``ChunkBuffer``s, queues waiters FIFO while all are
    held, and keeps a slot out of circulation until the worker using it has finished."""

    def __init__(self, memory: memoryview, layout: ArenaLayout) -> None:
        if memory.nbytes < layout.total:
            raise ValueError(f"arena of {memory.nbytes} bytes is smaller than {layout.total}")
        self.layout = layout
        self._memory = memory
        self._free = list(range(layout.capacity - 1, -1, -1))  # a stack: reuse warm slots
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()
        self._held: dict[int, ChunkBuffer] = {}
        self._busy: dict[int, concurrent.futures.Future[Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = Inbox()  # workers' results reach the loop without the GIL held
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this CpuPool is closed (aclose() was called)")

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[ChunkBuffer]:
        slot = await self._acquire()
        layout = self.layout
        start, rstart = layout.plain_offset(slot), layout.record_offset(slot)
        buf = ChunkBuffer(
            slot,
            self._memory[start : start + layout.chunk_size],
            self._memory[rstart : rstart + layout.record_size],
        )
        self._held[slot] = buf
        try:
            yield buf
        finally:
            self._give_back(buf)

    def check(self, buf: ChunkBuffer) -> None:
        """Raise unless ``buf`` is currently held from this pool and has no task running."""
        self.check_open()
        if self._held.get(buf.slot) is not buf:
            raise RuntimeError("this ChunkBuffer was given back or belongs to another pool")
        busy = self._busy.get(buf.slot)
        if busy is not None and not busy.done():
            raise RuntimeError("this ChunkBuffer already has a task in flight")

    async def run(self, buf: ChunkBuffer, submit: Callable[[], concurrent.futures.Future[T]]) -> T:
        """Submit work on ``buf`` (``check`` it first) and wait for its result."""
        future = submit()
        self._busy[buf.slot] = future
        return await self._inbox.wrap(future)

    async def _acquire(self) -> int:
        self.check_open()
        self._loop = asyncio.get_running_loop()
        if self._free and not self._waiters:
            return self._free.pop()
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a slot in the same instant we were cancelled: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._recycle(waiter.result())
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _give_back(self, buf: ChunkBuffer) -> None:
        busy = self._busy.pop(buf.slot, None)
        loop = self._loop
        if busy is None or busy.done() or loop is None:
            self._retire(buf)
            return

        # A cancelled call left a worker on this slot: recycle when it is done with it.
        def later(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to give back
                loop.call_soon_threadsafe(self._retire, buf)

        busy.add_done_callback(later)

    def _retire(self, buf: ChunkBuffer) -> None:
        buf._release()
        if self._held.get(buf.slot) is buf:
            del self._held[buf.slot]
            self._recycle(buf.slot)

    def _recycle(self, slot: int) -> None:
        if self.closed:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def close(self) -> None:
        """Refuse new work and wake every waiter with RuntimeError."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("this CpuPool was closed while waiting"))

    def release_views(self) -> None:
        """Revoke every view handed out (at close, after the workers have stopped)."""
        self._inbox.close()
        for buf in list(self._held.values()):
            buf._release()
        self._held.clear()
        self._busy.clear()
