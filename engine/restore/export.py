"""``SnapshotExport``: one disk of a snapshot served read-only, as an NBD backend.

::

    READ [offset, +length) ─► slots first..last ─► ids (DiskMap, id blocks cached)
                                 │  ZERO id ─► Hole piece (never read)
                                 └─ chunk id ─► cache ─hit─► Data piece (a view of the plaintext)
                                                  │ miss
                                                  ▼
                                   fetch task: pool buffer ← pread the record (thread)
                                               → CpuPool.decode → plaintext copied out
                                               → cache (LRU, ``cache_bytes`` bounded)
    sequential reader (a request starting where a recent one ended) ─► fetch tasks for the
    next ``read_ahead`` slots, into the cache

A chunk asked for by several requests at once (several connections, read-ahead) is fetched
once: every asker awaits the same fetch. Fetch tasks live in the export's TaskGroup
(``open`` holds it); a fetch that fails fails only the requests waiting for it, and is not
cached, so a later request tries again. Memory: the cache, at most ``pool.capacity`` chunks
being decoded, and the id blocks (``ID_BLOCKS`` × ``ID_BLOCK_SLOTS`` × 32 bytes).

BLOCK_STATUS (base:allocation) reports ZERO slots as HOLE|ZERO and every other slot as
data, merged into runs, at most ``STATUS_SLOTS`` slots per answer (clients ask again).

Raised from ``read``: ``CorruptRecord`` / ``ChunkMissing`` naming the chunk, and where a
slot needs it; the server answers that request with EIO and keeps serving. Each such text is
counted in ``failures``, so a caller whose client saw only EIO can name the damage.
"""

import asyncio
import collections
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final, TypeVar

from engine.core.errors import ChunkMissing, CorruptDiskMap, CorruptRecord, EngineError
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, ChunkId, short
from engine.core.units import MiB
from engine.io.nbd import protocol as p
from engine.io.nbd.server import Data, Hole, Piece
from engine.store.diskmap import DiskMap
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.util.tasks import leaves
from engine.workers.pool import CpuPool

T = TypeVar("T")

# Decoded chunks kept for rereads and read-ahead: 64 MiB is a few seconds of a sequential
# reader and enough for a filesystem's hot metadata; the CLI can change it.
DEFAULT_CACHE_BYTES: Final = 64 * MiB
# Chunks fetched ahead of a sequential reader: enough to keep the pool's workers busy while
# the client consumes the previous ones, few enough not to flush the cache.
DEFAULT_READ_AHEAD_BYTES: Final = 8 * MiB
# Slots whose ids are read at once, and how many such blocks are kept: 4096 ids (128 KiB)
# cover 4 GiB of disk at 1 MiB chunks.
ID_BLOCK_SLOTS: Final = 4096
ID_BLOCKS: Final = 16
# Slots one BLOCK_STATUS answer covers at most (a short answer; the client asks again).
STATUS_SLOTS: Final = 64 * 1024
# Recent request ends remembered to tell sequential readers (one per nbdcopy connection).
STREAMS: Final = 16

HOLE_ZERO: Final = p.STATE_HOLE | p.STATE_ZERO


class SnapshotExport:
    """The NBD backend of one disk of a snapshot; build it with ``open``."""

    def __init__(
        self,
        store: ChunkReader,
        pool: CpuPool,
        manifest: Manifest,
        disk: DiskEntry,
        diskmap: DiskMap,
        tasks: asyncio.TaskGroup,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        read_ahead_bytes: int = DEFAULT_READ_AHEAD_BYTES,
    ) -> None:
        self.store = store
        self.pool = pool
        self.manifest = manifest
        self.disk = disk
        self.size = disk.size
        self.chunk_size = manifest.chunk_size
        self.slots = diskmap.slots
        self._diskmap = diskmap
        self._tasks = tasks
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = max(cache_bytes, 2 * self.chunk_size)
        self._read_ahead = max(1, read_ahead_bytes // self.chunk_size)
        self._fetching: dict[bytes, asyncio.Future[bytes]] = {}
        self._id_blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._ends: collections.deque[int] = collections.deque(maxlen=STREAMS)
        self._background: set[asyncio.Task[None]] = set()  # fetches and read-aheads
        self._closed = False
        self.chunks_fetched = 0
        self.cache_hits = 0
        # What the store could not supply, by text (the client sees only EIO): a caller
        # names the damaged chunks in its own error (``files get``).
        self.failures: collections.Counter[str] = collections.Counter()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        store: ChunkReader,
        pool: CpuPool,
        manifest: Manifest,
        disk: DiskEntry,
        **options: int,
    ) -> AsyncIterator["SnapshotExport"]:
        """The export of ``disk``, its DiskMap open (checked against the manifest) and its
        fetch tasks running until the block exits. The caller holds the snapshot
        (``store.reading_snapshot``) and owns store and pool."""
        diskmap = await _blocking(store.open_diskmap, manifest, disk)
        try:
            if diskmap.disk_size != disk.size or diskmap.chunk_size != manifest.chunk_size:
                raise CorruptDiskMap(
                    path=diskmap.path,
                    reason=f"declares {diskmap.disk_size} bytes in chunks of "
                    f"{diskmap.chunk_size}; its manifest says {disk.size} in chunks of "
                    f"{manifest.chunk_size}",
                )
            try:
                async with asyncio.TaskGroup() as tasks:
                    export = cls(store, pool, manifest, disk, diskmap, tasks, **options)
                    try:
                        yield export
                    finally:
                        export._close()
            except BaseExceptionGroup as group:
                # Fetch tasks never fail (their errors go to their waiters): the error is
                # the caller's own, raised as itself.
                first, *others = leaves(group)
                for other in others:
                    first.add_note(f"also failed meanwhile: {other!r}")
                raise first from None
        finally:
            diskmap.close()

    async def idle(self) -> None:
        """Wait until no fetch or read-ahead runs (tests and benchmarks)."""
        while self._background:
            await asyncio.wait(set(self._background))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._tasks.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _close(self) -> None:
        self._closed = True
        for future in self._fetching.values():
            future.cancel()

    # --- the Backend protocol (engine.io.nbd.serve) ----------------------------------------

    async def read(self, offset: int, length: int) -> list[Piece]:
        try:
            return await self._read(offset, length)
        except (EngineError, OSError) as e:
            self.failures[str(e)] += 1
            raise

    async def _read(self, offset: int, length: int) -> list[Piece]:
        if length == 0:
            return []
        end = offset + length
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        ids = await self.ids(first, last - first + 1)
        wanted = {i: self._chunk(cid) for i, cid in enumerate(ids) if cid != ZERO_ID}
        self._note_read(offset, end, last)
        chunks = dict(zip(wanted, await asyncio.gather(*wanted.values()), strict=True))
        pieces: list[Piece] = []
        for i in range(len(ids)):
            slot_start = (first + i) * self.chunk_size
            start, stop = max(offset, slot_start), min(end, slot_start + self.chunk_size)
            plain = chunks.get(i)
            if plain is not None and len(plain) < stop - slot_start:
                raise CorruptRecord(
                    chunk=short(ids[i]),
                    pack="?",
                    offset=0,
                    reason=f"{len(plain)} bytes; disk {self.disk.disk_id} slot {first + i} "
                    f"needs {min(self.chunk_size, self.size - slot_start)}",
                )
            if plain is None:
                previous = pieces[-1] if pieces else None
                if isinstance(previous, Hole):
                    pieces[-1] = Hole(previous.offset, previous.length + stop - start)
                else:
                    pieces.append(Hole(start, stop - start))
            else:
                pieces.append(
                    Data(start, memoryview(plain)[start - slot_start : stop - slot_start])
                )
        return pieces

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = offset + length
        first = offset // self.chunk_size
        last = min((end - 1) // self.chunk_size, first + STATUS_SLOTS - 1)
        ids = await self.ids(first, last - first + 1)
        runs: list[list[int]] = []
        for i in range(len(ids)):
            slot_start = (first + i) * self.chunk_size
            start, stop = max(offset, slot_start), min(end, slot_start + self.chunk_size)
            flags = HOLE_ZERO if ids[i] == ZERO_ID else 0
            if runs and runs[-1][1] == flags:
                runs[-1][0] += stop - start
            else:
                runs.append([stop - start, flags])
        return [(n, flags) for n, flags in runs]

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise PermissionError(1, "the export is read-only")

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        raise PermissionError(1, "the export is read-only")

    async def flush(self) -> None:
        return None  # nothing is ever written

    # --- ids -----------------------------------------------------------------------------

    async def ids(self, first: int, count: int) -> list[bytes]:
        """The chunk ids of slots ``[first, first + count)``."""
        out: list[bytes] = []
        slot = first
        while slot < first + count:
            block_no = slot // ID_BLOCK_SLOTS
            block = self._id_blocks.get(block_no)
            if block is None:
                start = block_no * ID_BLOCK_SLOTS
                block = await _blocking(self._diskmap.ids, start, ID_BLOCK_SLOTS)
                self._id_blocks[block_no] = block
                while len(self._id_blocks) > ID_BLOCKS:
                    self._id_blocks.popitem(last=False)
            else:
                self._id_blocks.move_to_end(block_no)
            at = slot - block_no * ID_BLOCK_SLOTS
            n = min(first + count - slot, ID_BLOCK_SLOTS - at)
            raw = block[at * CHUNK_ID_SIZE : (at + n) * CHUNK_ID_SIZE]
            out += [raw[j : j + CHUNK_ID_SIZE] for j in range(0, len(raw), CHUNK_ID_SIZE)]
            slot += n
        return out

    # --- chunks: cache, shared fetches, read-ahead -----------------------------------------

    def _chunk(self, chunk_id: bytes) -> "asyncio.Future[bytes]":
        """The plaintext of ``chunk_id``: from the cache, or the fetch of it (shielded: a
        cancelled request does not cancel a fetch others may share)."""
        cached = self._cache.get(chunk_id)
        if cached is not None:
            self._cache.move_to_end(chunk_id)
            self.cache_hits += 1
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            future.set_result(cached)
            return future
        return asyncio.shield(self._fetch(chunk_id))

    def _fetch(self, chunk_id: bytes) -> "asyncio.Future[bytes]":
        """The one fetch of ``chunk_id`` (started now unless one runs): a future that its
        task completes, so a failure reaches the requests awaiting it, not the TaskGroup."""
        running = self._fetching.get(chunk_id)
        if running is not None:
            return running
        if self._closed:
            raise RuntimeError("the export is closed")
        result: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._fetching[chunk_id] = result
        self._start(self._fetch_task(chunk_id, result))
        return result

    async def _fetch_task(self, chunk_id: bytes, result: "asyncio.Future[bytes]") -> None:
        try:
            plain = await self._decode(ChunkId(chunk_id))
        except Exception as e:  # noqa: BLE001 - goes to every request waiting for it
            if not result.done():
                result.set_exception(e)
            return
        except asyncio.CancelledError:
            result.cancel()
            raise
        finally:
            self._fetching.pop(chunk_id, None)
        self._cache[chunk_id] = plain
        self._cache_bytes += len(plain)
        while self._cache_bytes > self._cache_limit and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= len(old)
        if not result.done():
            result.set_result(plain)

    async def _decode(self, chunk_id: ChunkId) -> bytes:
        async with self.pool.buffer() as buf:
            try:
                n, pack, offset = await _blocking(self.store.get_record_into, chunk_id, buf.record)
            except ChunkMissing:
                raise ChunkMissing(
                    chunk=short(chunk_id),
                    context=f" (needed by disk {self.disk.disk_id} of snapshot "
                    f"{self.manifest.snapshot_id})",
                ) from None
            buf.record_length = n
            data = await self.pool.decode(buf, chunk_id, pack, offset)
            self.chunks_fetched += 1
            if len(data) > self.chunk_size:
                raise CorruptRecord(
                    chunk=short(chunk_id),
                    pack=pack,
                    offset=offset,
                    reason=f"decoded {len(data)} bytes; slots hold {self.chunk_size}",
                )
            return bytes(data)

    def _note_read(self, offset: int, end: int, last: int) -> None:
        """Remember where this read ended; if it continues an earlier one, fetch ahead."""
        sequential = offset in self._ends
        if sequential:
            self._ends.remove(offset)
        self._ends.append(end)
        if sequential and not self._closed:
            self._start(self._read_ahead_from(last + 1))

    async def _read_ahead_from(self, slot: int) -> None:
        count = min(self._read_ahead, self.slots - slot)
        if count <= 0:
            return
        ids = await self.ids(slot, count)
        for chunk_id in ids:
            if chunk_id != ZERO_ID and chunk_id not in self._cache and not self._closed:
                future = self._fetch(chunk_id)
                # A failed read-ahead is not an error: the read that needs it fetches again.
                future.add_done_callback(_consume)


def _consume(future: "asyncio.Future[bytes]") -> None:
    if not future.cancelled():
        future.exception()


async def _blocking(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call in the default executor; a cancelled caller waits for it."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
