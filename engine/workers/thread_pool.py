"""``ThreadCpuPool``: CPU work on a thread pool, buffers in one preallocated bytearray.

blake3, zstandard and cryptography release the GIL while they work, so threads run the
codec in parallel without copying or pickling anything. One ``Codec`` is shared (it keeps
its zstd contexts per thread). The arena is allocated (and zero-filled, so every page is
faulted in) once, at construction, and reused for the life of the pool.
"""

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from engine.core.errors import WorkerError
from engine.core.ids import ChunkId
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
    fetch_decode_in_thread,
    ingest_in_thread,
)

# A task takes milliseconds; threads still busy after this long are stuck, and closing the
# pool must not hang the daemon's shutdown behind them.
SHUTDOWN_TIMEOUT: Final = 30.0


class ThreadCpuPool:
    """A ``CpuPool`` whose workers are threads of this process (see ``engine.workers``)."""

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
        self._arena = BufferArena(memoryview(bytearray(layout.total)), layout)
        self._codec = Codec(keys, level)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="tessera-cpu")

    def buffer(self) -> contextlib.AbstractAsyncContextManager[ChunkBuffer]:
        self._arena.check_open()
        return self._arena.hold()

    async def chunk_id(self, buf: ChunkBuffer) -> ChunkId:
        self._arena.check(buf)
        data = buf.data
        return await self._arena.run(buf, lambda: self._executor.submit(self._codec.chunk_id, data))

    async def encode(self, buf: ChunkBuffer, chunk_id: ChunkId) -> memoryview:
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        data, out = buf.data, buf.record
        buf.record_length = 0
        buf.record_length = await self._arena.run(
            buf, lambda: self._executor.submit(self._codec.encode_into, data, chunk_id, out)
        )
        return buf.record_data

    async def ingest(self, buf: ChunkBuffer, known: Known, put: Put) -> Ingested:
        self._arena.check(buf)
        data, out = buf.data, buf.record
        buf.record_length = 0
        done = await self._arena.run(
            buf,
            lambda: self._executor.submit(ingest_in_thread, self._codec, data, out, known, put),
        )
        buf.record_length = done.record_length
        return done

    async def decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, pack: str = "?", offset: int = 0
    ) -> memoryview:
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        record, out = buf.record_data, buf.plain
        buf.length = 0
        buf.length = await self._arena.run(
            buf,
            lambda: self._executor.submit(
                decode_into, self._codec, record, out, chunk_id, pack=pack, offset=offset
            ),
        )
        return buf.data

    async def fetch_decode(
        self, buf: ChunkBuffer, chunk_id: ChunkId, fetch: Fetch
    ) -> tuple[memoryview, str, int]:
        self._arena.check(buf)
        check_chunk_id(chunk_id)
        record, out = buf.record, buf.plain
        buf.length = buf.record_length = 0
        n, length, pack, offset = await self._arena.run(
            buf,
            lambda: self._executor.submit(
                fetch_decode_in_thread, self._codec, fetch, record, out, chunk_id
            ),
        )
        buf.record_length, buf.length = n, length
        return buf.data, pack, offset

    async def aclose(self) -> None:
        """Let submitted tasks finish, stop the threads and revoke every view. Idempotent.

        Raises WorkerError if threads are still busy after ``SHUTDOWN_TIMEOUT``."""
        if self._arena.closed:
            return
        self._arena.close()
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await asyncio.to_thread(self._executor.shutdown, wait=True)
        except TimeoutError:
            raise WorkerError(
                task="stopping the pool",
                reason=f"threads still busy after {SHUTDOWN_TIMEOUT:.0f} s (left running)",
            ) from None
        finally:
            self._arena.release_views()
