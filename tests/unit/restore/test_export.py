"""``SnapshotExport`` and ``Overlay`` (the backends of ``tessera export``) on a real store:
bytes of any range, holes, block status, the cache, shared fetches, read-ahead, a damaged
record failing only what needs it; the overlay's copy-on-write, zeroes, map and reopening."""

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.errors import ConfigError, CorruptRecord
from engine.io.nbd import protocol as p
from engine.io.nbd.server import Data, Hole, Piece
from engine.restore.export import SnapshotExport
from engine.restore.overlay import BLOCK, MAP_SUFFIX, Overlay
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.workers import ThreadCpuPool
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes, write_snapshot

CHUNK = 64 * 1024
HZ = p.STATE_HOLE | p.STATE_ZERO


def disk_bytes() -> bytes:
    """data, data, zero, zero, data (repeated chunk), data (short last slot)."""
    a = realistic_bytes(2 * CHUNK, seed=1)
    return a + bytes(2 * CHUNK) + a[:CHUNK] + realistic_bytes(CHUNK // 2 + 100, seed=2)


def join(pieces: list[Piece], offset: int, length: int) -> bytes:
    out = bytearray()
    pos = offset
    for piece in pieces:
        assert piece.offset == pos
        if isinstance(piece, Data):
            out += bytes(piece.data)
            pos += len(piece.data)
        else:
            out += bytes(piece.length)
            pos += piece.length
    assert pos == offset + length
    return bytes(out)


@pytest.fixture
async def served(make_store: StoreFactory) -> AsyncIterator[tuple[Store, Manifest, SnapshotExport]]:
    store = make_store(chunk_size=CHUNK)
    manifest = write_snapshot(store, "vm", {"d": disk_bytes()})
    pool = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=4)
    try:
        async with SnapshotExport.open(
            store,
            pool,
            manifest,
            manifest.disks[0],
            cache_bytes=3 * CHUNK,
            read_ahead_bytes=4 * CHUNK,
        ) as export:
            yield store, manifest, export
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 10), (CHUNK - 5, 10), (0, 6 * CHUNK), (CHUNK + 7, 3 * CHUNK), (5 * CHUNK, 50)],
)
async def test_any_range_reads_the_disk_bytes(
    served: tuple[Store, Manifest, SnapshotExport], offset: int, length: int
) -> None:
    _, _, export = served
    data = disk_bytes()
    length = min(length, len(data) - offset)
    pieces = await export.read(offset, length)
    assert join(pieces, offset, length) == data[offset : offset + length]


async def test_zero_slots_are_one_hole_and_never_read(
    served: tuple[Store, Manifest, SnapshotExport],
) -> None:
    _, _, export = served
    pieces = await export.read(CHUNK, 4 * CHUNK)
    assert [type(x) for x in pieces] == [Data, Hole, Data]
    assert pieces[1] == Hole(2 * CHUNK, 2 * CHUNK)
    status = await export.block_status(0, export.size)
    assert status == [(2 * CHUNK, 0), (2 * CHUNK, HZ), (export.size - 4 * CHUNK, 0)]
    assert await export.block_status(2 * CHUNK + 5, 10) == [(10, HZ)]


async def test_cache_and_shared_fetches_read_each_chunk_once(
    served: tuple[Store, Manifest, SnapshotExport],
) -> None:
    _, _, export = served
    # Slot 4 holds the same chunk as slot 0: three asks at once, one fetch.
    await asyncio.gather(export.read(0, 10), export.read(4 * CHUNK, 10), export.read(5, 5))
    assert export.chunks_fetched == 1
    await export.read(0, 100)
    assert export.chunks_fetched == 1 and export.cache_hits >= 1


async def test_sequential_reader_gets_read_ahead(
    served: tuple[Store, Manifest, SnapshotExport],
) -> None:
    _, _, export = served
    await export.read(0, CHUNK)
    await export.read(CHUNK, 100)  # continues the first: fetch slots 2-5 ahead
    await export.idle()
    fetched = export.chunks_fetched
    assert fetched == 3  # slots 0, 1 and 5 (2, 3 are zero; 4 is slot 0's chunk, cached)
    await export.read(CHUNK + 100, 4 * CHUNK)
    await export.idle()
    assert export.chunks_fetched == fetched


async def test_a_damaged_record_fails_only_the_reads_that_need_it(
    served: tuple[Store, Manifest, SnapshotExport],
) -> None:
    store, _, export = served
    victim = store.codec.chunk_id(disk_bytes()[CHUNK : 2 * CHUNK])
    loc = store.index.lookup(victim)
    assert loc is not None
    path = store.layout.packs / loc.pack[:2] / f"{loc.pack}.pack"
    with open(path, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptRecord):
        await export.read(CHUNK, 10)
    assert join(await export.read(0, 10), 0, 10) == disk_bytes()[:10]
    with pytest.raises(CorruptRecord):  # not cached: asked again, fails again
        await export.read(CHUNK + 5, 10)


async def test_overlay_copy_on_write_zeroes_and_reopen(
    served: tuple[Store, Manifest, SnapshotExport], tmp_path: Path
) -> None:
    _, manifest, export = served
    cow = tmp_path / "d.cow"

    def open_overlay(snapshot: str = manifest.snapshot_id) -> Overlay:
        return Overlay.open(export, cow, snapshot=snapshot, disk="d", size=export.size)

    expected = bytearray(disk_bytes())
    overlay = open_overlay()
    try:
        await overlay.write(100, b"x" * 300, fua=False)  # inside block 0: copy-on-write
        expected[100:400] = b"x" * 300
        await overlay.write_zeroes(CHUNK - 10, CHUNK + 20, fua=True)  # partial, whole, partial
        expected[CHUNK - 10 : 2 * CHUNK + 10] = bytes(CHUNK + 20)
        await overlay.write(3 * CHUNK - 4, b"y" * 8, fua=False)  # into a zero slot
        expected[3 * CHUNK - 4 : 3 * CHUNK + 4] = b"y" * 8
        await overlay.flush()
        pieces = await overlay.read(0, export.size)
        assert join(pieces, 0, export.size) == bytes(expected)
        status = await overlay.block_status(0, export.size)
        assert sum(n for n, _ in status) == export.size
        assert (CHUNK, HZ) in status  # the block zeroed whole
        assert all(a[1] != b[1] for a, b in itertools.pairwise(status))
    finally:
        overlay.close()
    assert (tmp_path / f"d.cow{MAP_SUFFIX}").exists()
    again = open_overlay()
    try:
        assert join(await again.read(0, export.size), 0, export.size) == bytes(expected)
    finally:
        again.close()
    assert join(await export.read(0, export.size), 0, export.size) == disk_bytes()
    with pytest.raises(ConfigError, match="belongs to disk d"):
        open_overlay("other")
    os.unlink(cow)
    with pytest.raises(ConfigError, match="is missing"):
        open_overlay()
    assert BLOCK == CHUNK  # the test's slots and overlay blocks coincide
