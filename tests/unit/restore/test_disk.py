"""``restore_disk`` against an in-memory target: bytes, zeros, dedup, stats, errors, cleanup."""

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest

from engine.core.errors import ChunkMissing, ConfigError, CorruptRecord
from engine.core.ids import short
from engine.restore.disk import RestoreStats, restore_disk
from engine.sources.types import DiskInfo
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.workers import ThreadCpuPool
from engine.workers.pool import CpuPool
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes, write_snapshot

CHUNK = 64 * 1024


class MemoryDisk:
    """A TargetDisk over a bytearray; records every connection and request."""

    def __init__(self, size: int, fresh: bool, fill: int = 0):
        self.info = DiskInfo("target", "target", size)
        self.fresh = fresh
        self.data = bytearray([fill]) * size
        self.writers: list[MemoryWriter] = []
        self.gate: asyncio.Event | None = None  # when set: writes wait for it
        self.write_started = asyncio.Event()
        self.fail_write_at: int | None = None

    async def open_writer(self) -> "MemoryWriter":
        writer = MemoryWriter(self)
        self.writers.append(writer)
        return writer


class MemoryWriter:
    def __init__(self, disk: MemoryDisk):
        self.disk = disk
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.flushed = False
        self.closed = False

    def _check(self, offset: int, length: int) -> None:
        assert not self.closed, "request on a closed writer"
        assert offset >= 0 and offset + length <= len(self.disk.data)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.disk.write_started.set()
        if self.disk.gate is not None:
            await self.disk.gate.wait()
        if self.disk.fail_write_at == offset:
            raise OSError(f"injected write failure at {offset}")
        self.disk.data[offset : offset + len(data)] = data
        self.writes.append((offset, len(data)))

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.disk.data[offset : offset + length] = bytes(length)
        self.zeroes.append((offset, length))

    async def flush(self) -> None:
        assert not self.closed
        self.flushed = True

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
async def pool(make_store: StoreFactory) -> AsyncIterator[tuple[Store, CpuPool]]:
    store = make_store(chunk_size=CHUNK)
    cpu = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=4)
    try:
        yield store, cpu
    finally:
        await cpu.aclose()


def template_disk() -> bytes:
    """11.5 chunks: data, a zero run, a block repeated five times, a short last slot."""
    block = realistic_bytes(CHUNK, seed=1)
    return (
        realistic_bytes(3 * CHUNK, seed=2)
        + bytes(3 * CHUNK)
        + block * 5
        + realistic_bytes(CHUNK // 2, seed=3)
    )


async def restore(
    store: Store, cpu: CpuPool, manifest: Manifest, target: MemoryDisk, **kw: object
) -> RestoreStats:
    return await restore_disk(store, cpu, manifest, manifest.disks[0], target, **kw)


async def test_fresh_target_gets_data_only(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    source = template_disk()
    manifest = write_snapshot(store, "vm", {"d": source})
    target = MemoryDisk(len(source), fresh=True)
    done: list[int] = []
    stats = await restore(store, cpu, manifest, target, writers=3, progress=done.append)
    assert bytes(target.data) == source
    assert len(target.writers) == 3
    assert all(w.flushed and w.closed for w in target.writers)
    assert not any(w.zeroes for w in target.writers)
    assert sum(done) == len(source) == stats.bytes_restored
    assert stats.zero_bytes_skipped == 3 * CHUNK
    assert stats.zero_bytes_written == 0
    assert stats.bytes_written == len(source) - 3 * CHUNK
    # 3 unique + 1 block read once for its five slots + the tail
    assert stats.chunks_read == stats.chunks_decoded == 5
    assert "restored disk d" in stats.summary()
    assert "5 chunks read" in stats.summary()


async def test_existing_target_gets_zeroes_written(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    source = template_disk()
    manifest = write_snapshot(store, "vm", {"d": source})
    target = MemoryDisk(len(source) + CHUNK, fresh=False, fill=0xAA)  # larger is allowed
    stats = await restore(store, cpu, manifest, target, writers=2)
    assert bytes(target.data[: len(source)]) == source
    assert bytes(target.data[len(source) :]) == b"\xaa" * CHUNK, "beyond the disk: untouched"
    zeroes = [z for w in target.writers for z in w.zeroes]
    assert zeroes == [(3 * CHUNK, 3 * CHUNK)], "one merged run"
    assert stats.zero_bytes_written == 3 * CHUNK
    assert stats.zero_bytes_skipped == 0


async def test_zero_tail_run_is_clipped_to_the_disk(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    source = realistic_bytes(CHUNK, seed=4) + bytes(2 * CHUNK - 10)
    manifest = write_snapshot(store, "vm", {"d": source})
    target = MemoryDisk(len(source), fresh=False, fill=1)
    await restore(store, cpu, manifest, target, writers=1)
    assert bytes(target.data) == source
    assert [z for w in target.writers for z in w.zeroes] == [(CHUNK, 2 * CHUNK - 10)]


async def test_a_write_failure_propagates_as_itself_and_closes_writers(
    pool: tuple[Store, CpuPool],
) -> None:
    store, cpu = pool
    source = realistic_bytes(6 * CHUNK, seed=5)
    manifest = write_snapshot(store, "vm", {"d": source})
    target = MemoryDisk(len(source), fresh=True)
    target.fail_write_at = 4 * CHUNK
    with pytest.raises(OSError, match="injected write failure at 262144"):
        await restore(store, cpu, manifest, target, writers=2)
    assert target.writers and all(w.closed for w in target.writers)
    assert not any(w.flushed for w in target.writers)


async def test_corrupt_record_names_chunk_and_pack(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    source = realistic_bytes(4 * CHUNK, seed=6)
    manifest = write_snapshot(store, "vm", {"d": source})
    victim = store.codec.chunk_id(source[2 * CHUNK : 3 * CHUNK])
    loc = store.index.lookup(victim)
    assert loc is not None
    path = store.layout.packs / loc.pack[:2] / f"{loc.pack}.pack"
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    target = MemoryDisk(len(source), fresh=True)
    with pytest.raises(CorruptRecord) as info:
        await restore(store, cpu, manifest, target)
    assert info.value.fields["chunk"] == short(victim)
    assert info.value.fields["pack"] == loc.pack
    assert info.value.fields["offset"] == loc.offset
    assert all(w.closed for w in target.writers)


async def test_missing_chunk_names_disk_and_slot(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    source = realistic_bytes(4 * CHUNK, seed=7)
    write_snapshot(store, "vm", {"d": source[: 2 * CHUNK]})  # slots 0-1 in a first pack
    manifest = write_snapshot(store, "vm", {"d": source})  # slots 2-3 in a second one
    victim = store.codec.chunk_id(source[2 * CHUNK : 3 * CHUNK])
    loc = store.index.lookup(victim)
    assert loc is not None
    store.index.drop_pack(loc.pack)
    target = MemoryDisk(len(source), fresh=True)
    with pytest.raises(ChunkMissing) as info:
        await restore(store, cpu, manifest, target)
    assert info.value.fields["chunk"] == short(victim)
    assert info.value.fields["disk"] == "d"
    assert info.value.fields["slot"] == 2
    assert info.value.fields["offset"] == 2 * CHUNK
    assert "disk d slot 2" in str(info.value)
    assert all(w.closed for w in target.writers)


async def test_cancel_mid_restore_closes_writers_and_propagates(
    pool: tuple[Store, CpuPool],
) -> None:
    store, cpu = pool
    source = realistic_bytes(8 * CHUNK, seed=8)
    manifest = write_snapshot(store, "vm", {"d": source})
    target = MemoryDisk(len(source), fresh=True)
    target.gate = asyncio.Event()  # never set: writes hang until cancelled
    task = asyncio.create_task(restore(store, cpu, manifest, target, writers=2))
    await target.write_started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(target.writers) == 2 and all(w.closed for w in target.writers)
    # Every pool buffer came back: the pool can hand out all of them again.
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(cpu.capacity):
            await stack.enter_async_context(cpu.buffer())


async def test_empty_disk(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    manifest = write_snapshot(store, "vm", {"d": b""})
    target = MemoryDisk(0, fresh=False)
    stats = await restore(store, cpu, manifest, target)
    assert stats.bytes_restored == stats.chunks_read == 0
    assert all(w.flushed and w.closed for w in target.writers)


async def test_target_smaller_than_the_disk_is_refused(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    manifest = write_snapshot(store, "vm", {"d": realistic_bytes(2 * CHUNK, seed=9)})
    target = MemoryDisk(2 * CHUNK - 1, fresh=True)
    with pytest.raises(ConfigError, match="needs 131072"):
        await restore(store, cpu, manifest, target)
    assert not target.writers


async def test_bad_arguments(pool: tuple[Store, CpuPool]) -> None:
    store, cpu = pool
    manifest = write_snapshot(store, "vm", {"d": realistic_bytes(CHUNK, seed=9)})
    with pytest.raises(ValueError, match="at least one writer"):
        await restore(store, cpu, manifest, MemoryDisk(CHUNK, True), writers=0)
    small = ThreadCpuPool(store.keys, CHUNK // 2, workers=1, capacity=1)
    try:
        with pytest.raises(ValueError, match="buffers hold"):
            await restore(store, small, manifest, MemoryDisk(CHUNK, True))
    finally:
        await small.aclose()
