"""``restore_disk(..., base=)``: only the slots whose id differs from the base's are written.

Disks are written as strings, one character per slot: ``0`` an all-zero slot, any other
character a data chunk of its own (the same character is the same chunk, so it dedups);
a trailing ``~`` makes the last slot half a chunk. The target starts holding the base.
"""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID
from engine.restore.disk import RestoreStats, restore_disk
from engine.restore.planner import DiskGeometry, SlotRun, plan_window
from engine.store import diskmap
from engine.store.chunk_store import Store
from engine.store.diskmap import DiskMap
from engine.store.index import Location
from engine.workers import ThreadCpuPool
from engine.workers.pool import CpuPool
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes, write_snapshot
from tests.unit.restore.test_disk import MemoryDisk

CHUNK = 64 * 1024


def disk_bytes(spec: str) -> bytes:
    short = spec.endswith("~")
    slots = spec.rstrip("~")
    out = bytearray()
    for i, c in enumerate(slots):
        n = CHUNK // 2 if short and i == len(slots) - 1 else CHUNK
        out += bytes(n) if c == "0" else realistic_bytes(n, seed=ord(c))
    return bytes(out)


@pytest.fixture
async def pool(make_store: StoreFactory) -> AsyncIterator[tuple[Store, CpuPool]]:
    store = make_store(chunk_size=CHUNK)
    cpu = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=4)
    try:
        yield store, cpu
    finally:
        await cpu.aclose()


async def refresh(
    store: Store, cpu: CpuPool, old: str | None, new: str, fresh: bool = False
) -> tuple[MemoryDisk, RestoreStats, list[int]]:
    new_data = disk_bytes(new)
    target = MemoryDisk(len(new_data), fresh=fresh, fill=0xEE)
    base: DiskMap | None = None
    if old is not None:
        old_data = disk_bytes(old)
        n = min(len(old_data), len(new_data))
        target.data[:n] = old_data[:n]  # the standby holds the base (up to its old size)
        base_manifest = write_snapshot(store, "vm", {"d": old_data})
        base = store.open_diskmap(base_manifest, base_manifest.disks[0])
    manifest = write_snapshot(store, "vm", {"d": new_data})
    done: list[int] = []
    try:
        stats = await restore_disk(
            store, cpu, manifest, manifest.disks[0], target, progress=done.append, base=base
        )
    finally:
        if base is not None:
            base.close()
    assert bytes(target.data) == new_data
    assert sum(done) == len(new_data) == stats.bytes_restored
    return target, stats, done


def touched(target: MemoryDisk) -> tuple[set[int], set[int]]:
    """(slots written with data, slots written with zeroes)."""
    data = {off // CHUNK for w in target.writers for off, _ in w.writes}
    zero: set[int] = set()
    for w in target.writers:
        for off, length in w.zeroes:
            zero |= set(range(off // CHUNK, -(-(off + length) // CHUNK)))
    return data, zero


CASES = [
    # old,       new,        data slots written, zeroed slots, skipped
    ("ABC0D", "ABC0D", set(), set(), 5),
    ("ABC0D", "AXC0D", {1}, set(), 4),
    ("ABC0D", "A0C0D", set(), {1}, 4),
    ("ABC0D", "ABCED", {3}, set(), 4),
    ("AAB", "ABA", {1, 2}, set(), 1),
    ("AB0", "AB000F", {5}, {3, 4}, 3),  # the disk grew: the new slots are written
    ("ABCDEF", "ABC", set(), set(), 3),  # a base longer than the disk: its tail is ignored
    ("ABC~", "ABX~", {2}, set(), 2),  # a changed short last slot
    ("00000", "0X0Y0", {1, 3}, set(), 3),
    ("XYZ", "000", set(), {0, 1, 2}, 0),
]


@pytest.mark.parametrize(("old", "new", "data", "zero", "skipped"), CASES)
async def test_only_changed_slots_are_written(
    pool: tuple[Store, CpuPool], old: str, new: str, data: set[int], zero: set[int], skipped: int
) -> None:
    store, cpu = pool
    target, stats, _ = await refresh(store, cpu, old, new)
    assert touched(target) == (data, zero)
    assert stats.slots_written == len(data) + len(zero)
    assert stats.slots_skipped == skipped
    assert stats.chunks_read == len({new.rstrip("~")[s] for s in data})  # once per chunk
    size = len(disk_bytes(new))
    assert stats.unchanged_bytes == size - stats.bytes_written - stats.zero_bytes_written


async def test_without_a_base_a_used_target_gets_every_slot(pool: tuple[Store, CpuPool]) -> None:
    """The rule after a failed refresh (the standby disk is dirty): base None on a target that
    is not fresh: every slot is written, zero slots with write_zeroes."""
    store, cpu = pool
    target, stats, _ = await refresh(store, cpu, None, "A0B0~")
    assert touched(target) == ({0, 2}, {1, 3})
    assert (stats.slots_written, stats.slots_skipped) == (4, 0)


async def test_a_base_overrides_a_fresh_target(pool: tuple[Store, CpuPool]) -> None:
    """With a base the target holds the base's data: a slot that became zero is zeroed even
    when the target calls itself fresh."""
    store, cpu = pool
    target, stats, _ = await refresh(store, cpu, "AB", "A0", fresh=True)
    assert touched(target) == (set(), {1})
    assert stats.zero_bytes_skipped == 0


async def test_a_base_of_another_chunk_size_is_refused(
    pool: tuple[Store, CpuPool], tmp_path: Path
) -> None:
    store, cpu = pool
    manifest = write_snapshot(store, "vm", {"d": disk_bytes("AB")})
    path = tmp_path / "other.diskmap"
    path.write_bytes(diskmap.encode(2 * CHUNK, 2 * CHUNK, ZERO_ID))
    with DiskMap(path) as base:
        target = MemoryDisk(2 * CHUNK, fresh=False)
        with pytest.raises(ValueError, match="chunks of 131072"):
            await restore_disk(store, cpu, manifest, manifest.disks[0], target, base=base)
    assert not target.writers


def test_plan_window_runs() -> None:
    """Unchanged runs split zero runs; slots past a short base are planned as changed."""
    a, b = b"\x01" * CHUNK_ID_SIZE, b"\x02" * CHUNK_ID_SIZE
    z = ZERO_ID
    ids = z + z + z + a + b + z
    base = z + b"\x09" * CHUNK_ID_SIZE + z + a
    geometry = DiskGeometry("d", 6 * CHUNK, CHUNK)

    def lookup(chunk_id: bytes) -> Location:
        return Location(pack="p", offset=chunk_id[0] * 100, length=10, plain_len=CHUNK)

    plan = plan_window(0, ids, lookup, geometry, base)
    assert plan.unchanged_runs == (SlotRun(0, 1), SlotRun(2, 2))
    assert plan.zero_runs == (SlotRun(1, 1), SlotRun(5, 1))
    assert [r.slots for r in plan.reads()] == [(4,)]
