"""``restore_disk``: restore one disk of a snapshot into a ``TargetDisk``.

::

    planner ──plans (PLANS_AHEAD)──► dispatcher ──work queue (pool.capacity)──► chunk workers
    thread: DiskMap ids +           pack by pack, ascending      (pool.capacity tasks, each
    index lookups per window        offset (zero runs → zero     holding a pool buffer):
                                    work, unless the target      pread the record into the
                                    is fresh)                    buffer and decode it (one
                                                                 pool hand-off) → write
                                                                 every slot it fills over
                                                                 an idle writer
                                                                 (N connections)
    then: flush every writer; close every writer (always)

With ``base`` (the DiskMap of the same disk in the snapshot the target already holds), slots
whose id equals the base's at the same slot are *unchanged*: not read, not written (counted
in ``RestoreStats.slots_skipped``); every other slot is written, a slot that became ZERO
with ``write_zeroes`` (the target holds the base's data, so it is never treated as fresh).
A restore with a base is a refresh: only the slots that differ travel.

The pipeline's tasks live in one ``asyncio.TaskGroup`` (the flushes in a second one): the
first failure cancels the rest and is raised as itself (not as an ``ExceptionGroup``), other
failures ride along as notes on it.
Blocking calls (DiskMap reads, SQLite lookups) run in executor threads; when cancelled, a
restore waits for such a call to return before it closes what the call uses. A record's
``pread`` runs with its decode on the pool (``CpuPool.fetch_decode``): a cancelled restore
does not wait for it (``Store.get_record_into`` only reads a pack by its path; the pool keeps
the buffer until the worker is done, and its ``aclose`` waits for every worker).

Who closes what: ``restore_disk`` opens ``writers`` connections with
``target.open_writer()`` and closes each of them (also on failure and cancellation, each
close bounded by ``CLOSE_TIMEOUT``); it opens and closes the disk's DiskMap. The store, the
pool and the target stay open: they belong to the caller. On failure the target holds a
partial disk; deleting it is the target's business (``plugins.local.target`` does).

Raised: ``CorruptRecord`` (naming chunk, pack and offset) and ``ChunkMissing`` (naming
chunk, disk, slot and offset) as themselves; ``CorruptDiskMap`` from opening the DiskMap;
``ConfigError`` when the target disk is smaller than the disk; whatever the target's
writers raise (their own ``EngineError``s), unchanged; ``ValueError`` for caller mistakes
(``writers`` < 1, a pool whose buffers are smaller than the store's chunks, a base with
another chunk size).
"""

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from engine.core.errors import ChunkMissing, ConfigError, CorruptDiskMap, CorruptRecord
from engine.core.ids import short
from engine.core.units import MiB, human_bytes, human_rate
from engine.restore.planner import DiskGeometry, Read, WindowPlan, plan_disk
from engine.sources.types import DiskWriter, TargetDisk
from engine.store.diskmap import DiskMap
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.util import failpoints
from engine.util.tasks import run_group
from engine.workers.pool import ChunkBuffer, CpuPool

T = TypeVar("T")

# Plans queued ahead of the dispatcher: one lets the next window's index lookups overlap this
# window's reads; more would only hold more plans in memory.
PLANS_AHEAD: Final = 1
# Zeroing requests are split at this size: NBD request lengths are 32-bit and servers cap
# them below that; 1 GiB is far above what makes zeroing efficient and far below any cap.
MAX_ZERO_REQUEST: Final = 1024 * MiB
# A writer whose close takes this long talks to a dead server; cleanup must not hang on it.
CLOSE_TIMEOUT: Final = 30.0


@dataclass
class RestoreStats:
    """What a restore of one disk did; ``summary()`` is its one-line report."""

    disk_id: str
    disk_size: int
    bytes_written: int = 0  # data bytes written from decoded chunks (every slot counted)
    zero_bytes_skipped: int = 0  # zero slots left alone on a fresh target
    zero_bytes_written: int = 0  # zero slots written with write_zeroes
    unchanged_bytes: int = 0  # slots equal to the base's: neither read nor written
    slots_written: int = 0  # slots that got data or zeroes
    slots_skipped: int = 0  # slots equal to the base's (only with a base)
    chunks_read: int = 0  # records read from packs (a chunk shared by slots counts once)
    chunks_decoded: int = 0
    seconds: float = 0.0

    @property
    def bytes_restored(self) -> int:
        return (
            self.bytes_written
            + self.zero_bytes_skipped
            + self.zero_bytes_written
            + self.unchanged_bytes
        )

    @property
    def bytes_per_s(self) -> float:
        """Disk bytes restored per second."""
        return self.bytes_restored / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"restored disk {self.disk_id}: {human_bytes(self.bytes_restored)} in "
            f"{self.seconds:.2f} s ({human_rate(self.bytes_per_s)}); "
            f"{human_bytes(self.bytes_written)} data from {self.chunks_read} chunks read "
            f"({self.chunks_decoded} decoded), zero {human_bytes(self.zero_bytes_skipped)} "
            f"skipped / {human_bytes(self.zero_bytes_written)} written; "
            f"{self.slots_written} slots written, {self.slots_skipped} unchanged"
        )


@dataclass(slots=True)
class _Data:
    read: Read


@dataclass(slots=True, frozen=True)
class _Zero:
    offset: int
    length: int


_Work = _Data | _Zero | None  # None: no more work (one per chunk worker)


async def restore_disk(
    store: ChunkReader,
    pool: CpuPool,
    manifest: Manifest,
    disk: DiskEntry,
    target: TargetDisk,
    *,
    writers: int = 4,
    progress: Callable[[int], None] | None = None,
    base: DiskMap | None = None,
) -> RestoreStats:
    """Restore ``disk`` of ``manifest`` from ``store`` into ``target``; see the module doc.

    ``writers`` is the number of concurrent connections to the target. ``progress`` is
    called on the event loop with the disk bytes just finished (written, zeroed or skipped);
    the calls add up to ``disk.size`` when the restore succeeds. ``base``: the ids the
    target already holds (module doc); it stays open (the caller's), read from an executor
    thread while the restore runs.
    """
    if writers < 1:
        raise ValueError(f"a restore needs at least one writer, not {writers}")
    if pool.chunk_size < manifest.chunk_size:
        raise ValueError(
            f"the CpuPool's buffers hold {pool.chunk_size} bytes; the store's chunks are "
            f"{manifest.chunk_size}"
        )
    if base is not None and base.chunk_size != manifest.chunk_size:
        raise ValueError(
            f"base {base.path} has chunks of {base.chunk_size} bytes; disk {disk.disk_id} "
            f"of snapshot {manifest.snapshot_id} has {manifest.chunk_size}"
        )
    if target.info.size < disk.size:
        raise ConfigError(
            message=f"target disk {target.info.name} has {target.info.size} bytes; "
            f"disk {disk.disk_id} of snapshot {manifest.snapshot_id} needs {disk.size}"
        )
    started = time.monotonic()
    stats = RestoreStats(disk.disk_id, disk.size)
    diskmap = await _blocking(store.open_diskmap, manifest, disk, discard=DiskMap.close)
    try:
        if diskmap.disk_size != disk.size or diskmap.chunk_size != manifest.chunk_size:
            raise CorruptDiskMap(
                path=diskmap.path,
                reason=f"declares {diskmap.disk_size} bytes in chunks of {diskmap.chunk_size}; "
                f"its manifest says {disk.size} in chunks of {manifest.chunk_size}",
            )
        geometry = DiskGeometry(disk.disk_id, disk.size, manifest.chunk_size)
        fresh = target.fresh and base is None  # a refreshed target holds the base's data
        run = _Restore(store, pool, diskmap, geometry, fresh, stats, progress, base)
        await run.execute(target, writers)
    finally:
        diskmap.close()
    stats.seconds = time.monotonic() - started
    return stats


@dataclass
class _Restore:
    store: ChunkReader
    pool: CpuPool
    diskmap: DiskMap
    geometry: DiskGeometry
    fresh: bool
    stats: RestoreStats
    progress: Callable[[int], None] | None
    base: DiskMap | None = None
    idle: asyncio.Queue[DiskWriter] = field(default_factory=asyncio.Queue)

    async def execute(self, target: TargetDisk, writers: int) -> None:
        opened: list[DiskWriter] = []
        failure: BaseException | None = None
        try:
            for _ in range(writers):
                opened.append(await target.open_writer())
            for writer in opened:
                self.idle.put_nowait(writer)
            await run_group(self._pipeline)
            await run_group(lambda tg: [tg.create_task(w.flush()) for w in opened])
        except BaseException as e:
            failure = e
            raise
        finally:
            errors = await _close_all(opened)
            if failure is not None:
                for error in errors:
                    failure.add_note(f"also failed closing a writer: {error!r}")
            elif errors:
                for error in errors[1:]:
                    errors[0].add_note(f"also failed closing a writer: {error!r}")
                raise errors[0]

    def _pipeline(self, tg: asyncio.TaskGroup) -> None:
        workers = self.pool.capacity  # one per pool buffer: every buffer can be busy
        plans: asyncio.Queue[WindowPlan | None] = asyncio.Queue(PLANS_AHEAD)
        # Planned reads waiting for a worker: as many as the pool has buffers, so every
        # worker finds the next one ready.
        work: asyncio.Queue[_Work] = asyncio.Queue(self.pool.capacity)
        tg.create_task(self._planner(plans))
        tg.create_task(self._dispatcher(plans, work, workers))
        for _ in range(workers):
            tg.create_task(self._worker(work))

    async def _planner(self, plans: asyncio.Queue[WindowPlan | None]) -> None:
        base = self.base.iter_blocks() if self.base is not None else None
        windows = plan_disk(self.diskmap.iter_blocks(), self.store.locate, self.geometry, base=base)
        while (plan := await _blocking(_next_or_none, windows)) is not None:
            self.store.prefetch([group.pack for group in plan.packs])
            await plans.put(plan)
        await plans.put(None)

    async def _dispatcher(
        self,
        plans: asyncio.Queue[WindowPlan | None],
        work: asyncio.Queue[_Work],
        workers: int,
    ) -> None:
        while (plan := await plans.get()) is not None:
            for run in plan.unchanged_runs:
                _, length = self.geometry.run_span(run)
                self.stats.slots_skipped += run.count
                self.stats.unchanged_bytes += length
                self._progress(length)
            for run in plan.zero_runs:
                offset, length = self.geometry.run_span(run)
                if self.fresh:
                    self.stats.zero_bytes_skipped += length
                    self._progress(length)
                    continue
                self.stats.slots_written += run.count
                for piece in range(offset, offset + length, MAX_ZERO_REQUEST):
                    await work.put(_Zero(piece, min(MAX_ZERO_REQUEST, offset + length - piece)))
            for read in plan.reads():
                await work.put(_Data(read))
        for _ in range(workers):
            await work.put(None)

    async def _fetch_decode(self, read: Read, buf: ChunkBuffer) -> tuple[memoryview, str, int]:
        """Read the record of ``read`` into ``buf`` and decode it, in one pool hand-off;
        returns the plaintext and where the record was read (the chunk may have moved since
        planning)."""
        fetch = functools.partial(self.store.get_record_into, read.chunk_id, where=read.location)
        try:
            data, pack, offset = await self.pool.fetch_decode(buf, read.chunk_id, fetch)
        except ChunkMissing:
            # Gone since planning (a concurrent repair or prune): name where it was needed.
            slot = read.slots[0]
            offset = self.geometry.slot_offset(slot)
            raise ChunkMissing(
                chunk=short(read.chunk_id),
                context=f" (needed by disk {self.geometry.disk_id} slot {slot} at offset "
                f"{offset}; indexed in pack {read.pack} when planned)",
                disk=self.geometry.disk_id,
                slot=slot,
                offset=offset,
            ) from None
        self.stats.chunks_read += 1
        self.stats.chunks_decoded += 1
        return data, pack, offset

    async def _worker(self, work: asyncio.Queue[_Work]) -> None:
        while (item := await work.get()) is not None:
            if isinstance(item, _Zero):
                async with self._writer() as writer:
                    await writer.write_zeroes(item.offset, item.length)
                self.stats.zero_bytes_written += item.length
                self._progress(item.length)
                continue
            read = item.read
            async with self.pool.buffer() as buf:
                # Each worker reads its record straight into its buffer and decodes it there,
                # in one hand-off to the pool: reads run in parallel, and no record is
                # allocated or copied on the way to the decoder.
                data, pack, offset = await self._fetch_decode(read, buf)
                if len(data) != read.location.plain_len:
                    raise CorruptRecord(
                        chunk=short(read.chunk_id),
                        pack=pack,
                        offset=offset,
                        reason=f"decoded {len(data)} bytes; disk {self.geometry.disk_id} "
                        f"slot {read.slots[0]} needs {read.location.plain_len}",
                    )
                async with self._writer() as writer:
                    for slot in read.slots:
                        await writer.write(self.geometry.slot_offset(slot), data)
                        self.stats.bytes_written += len(data)
                        self.stats.slots_written += 1
                        self._progress(len(data))
            failpoints.hit("restore.chunk.written")

    @contextlib.asynccontextmanager
    async def _writer(self) -> AsyncIterator[DiskWriter]:
        """Hold one idle writer connection for a series of requests."""
        writer = await self.idle.get()
        try:
            yield writer
        finally:
            self.idle.put_nowait(writer)

    def _progress(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)


def _next_or_none(it: Iterator[T]) -> T | None:
    return next(it, None)


async def _blocking(
    fn: Callable[..., T], *args: object, discard: Callable[[T], object] | None = None
) -> T:
    """Run a blocking call in the default executor. If cancelled, wait for the call to
    return before propagating, so the caller never closes what a running thread uses; a
    result nobody will receive then goes to ``discard`` (e.g. to close it)."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is None and discard is not None:
            discard(future.result())
        raise


async def _close_all(writers: Sequence[DiskWriter]) -> list[Exception]:
    """Close every writer (each bounded by CLOSE_TIMEOUT); return what closing raised."""
    errors: list[Exception] = []
    for writer in writers:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await writer.close()
        except Exception as e:  # noqa: BLE001 - every writer must get its close; reported above
            errors.append(e)
    return errors
