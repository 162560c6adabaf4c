"""Back up one disk: plan slots window by window, read the READ slots with N readers.

``backup_disk`` is the whole pipeline of the package docstring for one ``SourceDisk``. The
caller owns the ``DiskMapWriter`` (and commits or aborts the snapshot), the pool and the
store; this function only fills the DiskMap and puts chunks. Raises ``SourceError`` naming
the disk and offset when a read keeps failing, and whatever the store or pool raise
(integrity errors are never retried).
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import structlog

from engine.core.errors import EngineError, SourceError
from engine.core.ids import ZERO_ID
from engine.core.units import MiB, human_bytes, human_rate
from engine.pipeline.defaults import DEFAULT_READERS
from engine.pipeline.slots import Slot, classify
from engine.sources.types import DiskReader, SourceDisk
from engine.store.diskmap import DiskMap, DiskMapWriter
from engine.store.protocols import ChunkWriter
from engine.util import failpoints
from engine.util.retry import DEFAULT_POLICY, RetryPolicy, retry
from engine.util.tasks import run_group
from engine.workers import ChunkBuffer, CpuPool

# Extents are asked for this far ahead of the readers: one BLOCK_STATUS round trip per
# window, small enough that a huge disk never needs its whole extent list in memory.
WINDOW_BYTES: Final = 1024 * MiB
QUEUE_PER_READER: Final = 2  # slots waiting per reader: keeps readers busy, memory bounded

log = structlog.get_logger("tessera.pipeline")


@dataclass
class DiskStats:
    disk_id: str
    size: int
    slots: int = 0
    zero_slots: int = 0
    clean_slots: int = 0
    read_slots: int = 0
    bytes_read: int = 0
    new_chunks: int = 0
    known_chunks: int = 0
    bytes_stored: int = 0  # record bytes this backup appended (compressed, encrypted)
    retries: int = 0
    seconds: float = 0.0
    fallback_reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    name: str = ""  # the disk's name (the source's alias); mails show it

    @property
    def bytes_per_s(self) -> float:
        """Bytes read from the source per second."""
        return self.bytes_read / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (
            f"disk {self.disk_id}: {self.slots} slots, read {self.read_slots} "
            f"({human_bytes(self.bytes_read)}), reused {self.clean_slots}, zero "
            f"{self.zero_slots}, new chunks {self.new_chunks}, known {self.known_chunks}, "
            f"{self.seconds:.2f} s, {human_rate(self.bytes_per_s)}"
        )


async def backup_disk(
    *,
    store: ChunkWriter,
    pool: CpuPool,
    disk: SourceDisk,
    diskmap: DiskMapWriter,
    parent: DiskMap | None,
    readers: int = DEFAULT_READERS,
    progress: Callable[[int], None] | None = None,
    retry_policy: RetryPolicy = DEFAULT_POLICY,
) -> DiskStats:
    """Fill ``diskmap`` for ``disk``. With ``parent`` and ``disk.checkpoint_parent`` set,
    clean slots reuse the parent's ids; otherwise every non-zero slot is read."""
    run = _DiskBackup(store, pool, disk, diskmap, parent, progress, retry_policy)
    run.queue = asyncio.Queue(maxsize=readers * QUEUE_PER_READER)  # bounded: memory
    started = time.perf_counter()

    # Readers hand filled buffers to processors and read on: the CPU pool always has work
    # queued while reads are in flight. Buffers (the pool's capacity) bound both.
    processors = max(2, pool.capacity - readers)

    # A source whose reader takes several reads at once (imageio: pipelined GETs on one
    # connection) gets that many lanes per reader, each with its own buffer.
    lanes = max(1, getattr(disk, "reader_pipeline", 1))

    async def produce() -> None:
        def start(tg: asyncio.TaskGroup) -> None:
            tg.create_task(run.plan(readers * lanes))
            for _ in range(readers):
                tg.create_task(run.reader(lanes))

        await run_group(start)
        for _ in range(processors):
            run.filled.put_nowait(None)

    def start_all(tg: asyncio.TaskGroup) -> None:
        tg.create_task(produce())
        for _ in range(processors):
            tg.create_task(run.processor())

    try:
        await run_group(start_all)
    finally:
        await run.release_unprocessed()
    run.stats.seconds = time.perf_counter() - started
    return run.stats


class _DiskBackup:
    """The state one ``backup_disk`` call shares between its planner and readers."""

    def __init__(
        self,
        store: ChunkWriter,
        pool: CpuPool,
        disk: SourceDisk,
        diskmap: DiskMapWriter,
        parent: DiskMap | None,
        progress: Callable[[int], None] | None,
        retry_policy: RetryPolicy,
    ):
        self.store, self.pool, self.disk, self.diskmap = store, pool, disk, diskmap
        self.parent = parent
        self.progress = progress
        self.retry_policy = retry_policy
        self.size, self.chunk = disk.info.size, store.config.chunk_size
        self.stats = DiskStats(
            disk.info.disk_id, self.size, slots=diskmap.slots, name=disk.info.name
        )
        self.stats.fallback_reason = disk.fallback_reason
        self.incremental = parent is not None and disk.checkpoint_parent is not None
        # Chunks verify found damaged: a clean slot holding one is read again, so that the
        # backup stores a good copy (heals it) instead of referencing the bad one.
        self.bad = store.bad_chunk_ids() if self.incremental else set()
        if parent is not None and (
            parent.chunk_size != self.chunk or parent.disk_size != self.size
        ):
            self.incremental = False
            self.stats.fallback_reason = "disk size changed since the parent snapshot"
        # Slots that read as zero although the extents did not say so hash to these.
        lengths = {self.chunk, self.size % self.chunk or self.chunk}
        self.zero_ids = {n: store.codec.chunk_id(bytes(n)) for n in lengths}
        self.queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=QUEUE_PER_READER)
        # Read buffers waiting for a processor; bounded by the pool's buffers.
        self.filled: asyncio.Queue[_Filled | None] = asyncio.Queue()

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)

    def slot_length(self, slot: int) -> int:
        return min(self.chunk, self.size - slot * self.chunk)

    async def plan(self, readers: int) -> None:
        slots_per_window = max(1, WINDOW_BYTES // self.chunk)
        for first in range(0, self.diskmap.slots, slots_per_window):
            count = min(slots_per_window, self.diskmap.slots - first)
            start, end = first * self.chunk, min((first + count) * self.chunk, self.size)
            zero = await self.disk.extents(start, end - start)
            dirty = await self.disk.dirty_extents(start, end - start) if self.incremental else None
            decisions = classify(first, count, self.chunk, self.size, zero, dirty)
            for slot, decision in enumerate(decisions, start=first):
                if decision is Slot.ZERO:
                    self.diskmap.set_zero(slot, 1)
                    self.stats.zero_slots += 1
                    self.advance(self.slot_length(slot))
                elif (
                    decision is Slot.CLEAN
                    and self.parent is not None
                    and (self.parent.get(slot) not in self.bad)
                ):
                    self.diskmap.set(slot, self.parent.get(slot))
                    self.stats.clean_slots += 1
                    self.advance(self.slot_length(slot))
                else:
                    await self.queue.put(slot)
        # Only on success: after a failure the TaskGroup cancels the readers instead.
        for _ in range(readers):
            await self.queue.put(None)

    async def reader(self, lanes: int = 1) -> None:
        """One connection; ``lanes`` tasks read through it at once (each ends at a None)."""
        conn = _Connection(self.disk)
        try:
            await run_group(lambda tg: [tg.create_task(self.lane(conn)) for _ in range(lanes)])
        finally:
            await conn.close()

    async def lane(self, conn: "_Connection") -> None:
        while (slot := await self.queue.get()) is not None:
            holder = contextlib.AsyncExitStack()
            buf = await holder.enter_async_context(self.pool.buffer())
            try:
                await self.read_into(conn, slot, buf)
            except BaseException:
                await holder.aclose()
                raise
            self.filled.put_nowait(_Filled(holder, buf, slot))

    async def read_into(self, conn: "_Connection", slot: int, buf: ChunkBuffer) -> None:
        offset, length = slot * self.chunk, self.slot_length(slot)
        disk_id, stats = self.disk.info.disk_id, self.stats

        def retried(attempt: int, error: BaseException) -> None:
            stats.retries += 1  # the connection marked itself broken: the next attempt opens anew
            log.info("read.retry", disk=disk_id, offset=offset, attempt=attempt, error=str(error))

        view = buf.plain[:length]
        try:
            await retry(
                lambda: conn.readinto(offset, view), policy=self.retry_policy, on_retry=retried
            )
        except EngineError as e:
            raise SourceError(disk=disk_id, offset=offset, reason=str(e)) from e
        except OSError as e:
            # "ConnectionResetError: reset by peer", not its repr: the reason reaches
            # mails, webhooks and log collectors (issue 16).
            reason = f"{type(e).__name__}: {e}".rstrip(": ")
            raise SourceError(disk=disk_id, offset=offset, reason=reason) from e
        finally:
            view.release()
        buf.length = length

    async def processor(self) -> None:
        while (item := await self.filled.get()) is not None:
            async with item.holder:
                await self.process(item.buf, item.slot)
            failpoints.hit("pipeline.slot.done")
            self.advance(self.slot_length(item.slot))

    async def process(self, buf: ChunkBuffer, slot: int) -> None:
        # One hand-off to the pool per chunk: hash, the known/zero check, encode and the
        # store's put all run there (``CpuPool.ingest``); the loop only records the outcome.
        length, stats = buf.length, self.stats
        zero, has = self.zero_ids[length], self.store.has
        done = await self.pool.ingest(buf, lambda cid: cid == zero or has(cid), self.store.put)
        if done.chunk_id == zero:
            self.diskmap.set(slot, ZERO_ID)
            stats.zero_slots += 1
        else:
            self.diskmap.set(slot, done.chunk_id)
            stats.read_slots += 1
            stats.new_chunks += done.written
            stats.known_chunks += not done.written
            stats.bytes_stored += done.record_length if done.written else 0
        stats.bytes_read += length

    async def release_unprocessed(self) -> None:
        """Give back the buffers of reads no processor took (after a failure)."""
        while not self.filled.empty():
            item = self.filled.get_nowait()
            if item is not None:
                await item.holder.aclose()


@dataclass
class _Filled:
    holder: contextlib.AsyncExitStack  # exiting it gives the buffer back to the pool
    buf: ChunkBuffer
    slot: int


@dataclass
class _Held:
    reader: DiskReader
    users: int = 0  # reads in flight on it
    broken: bool = False


class _Connection:
    """A reader's connection, replaced after a failed read (the old one may be dead or out
    of sync; opening a new one costs one handshake). Its lanes share it: a read that fails
    sets the reader aside (the next read of any lane opens a new one) and the last read in
    flight on it closes it, so no lane's read is cut short by another's failure."""

    def __init__(self, disk: SourceDisk):
        self._disk = disk
        self._held: _Held | None = None
        self._opening = asyncio.Lock()

    async def readinto(self, offset: int, buf: memoryview) -> None:
        async with self._opening:  # lanes starting together open one reader
            if self._held is None:
                self._held = _Held(await self._disk.open_reader())
            held = self._held
            held.users += 1
        try:
            await held.reader.readinto(offset, buf)
        except Exception:
            held.broken = True
            if self._held is held:
                self._held = None
            raise
        finally:
            held.users -= 1
            if held.broken and not held.users:
                await self._close_quietly(held.reader)

    async def _close_quietly(self, reader: DiskReader) -> None:
        try:
            await reader.close()
        except (EngineError, OSError) as e:
            log.info("reader.close_failed", disk=self._disk.info.disk_id, error=str(e))

    async def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.reader.close()
