"""The restore planner: coverage, pack order, dedup inside a window, missing and odd chunks."""

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.core.errors import ChunkMissing, CorruptRecord
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.restore.planner import (
    WINDOW_SLOTS,
    DiskGeometry,
    SlotRun,
    WindowPlan,
    plan_disk,
    plan_window,
    windows,
)
from engine.store.index import Location

CHUNK = 64 * 1024
TAIL_ID = b"\xff" * CHUNK_ID_SIZE  # the only id allowed in a short last slot


def cid(n: int) -> bytes:
    return bytes([n]) * CHUNK_ID_SIZE


@dataclass
class Disk:
    """A generated disk: its ids, geometry and a store index as a dict."""

    ids: list[bytes]
    geometry: DiskGeometry
    index: dict[bytes, Location]

    def blocks(self, size: int) -> Iterator[bytes]:
        raw = b"".join(self.ids)
        step = size * CHUNK_ID_SIZE
        for i in range(0, len(raw), step):
            yield raw[i : i + step]


@st.composite
def disks(draw: st.DrawFn) -> Disk:
    ids = draw(st.lists(st.integers(0, 12).map(cid), min_size=1, max_size=120))
    short_tail = draw(st.integers(0, CHUNK - 1))
    if short_tail and ids[-1] != ZERO_ID:
        ids[-1] = TAIL_ID
    geometry = DiskGeometry("disk-a", len(ids) * CHUNK - short_tail, CHUNK)
    packs = draw(st.integers(1, 4))
    index: dict[bytes, Location] = {}
    for chunk_id in dict.fromkeys(i for i in ids if i != ZERO_ID):
        pack = f"pack{draw(st.integers(0, packs - 1))}"
        # Offsets are unique per pack, drawn in no particular order.
        offset = draw(st.integers(0, 10**6)) * 256 + len(index)
        plain = CHUNK - short_tail if chunk_id == TAIL_ID else CHUNK
        index[chunk_id] = Location(pack, offset, 100, plain)
    return Disk(ids, geometry, index)


class CountingLookup:
    def __init__(self, index: dict[bytes, Location]):
        self.index = index
        self.calls: Counter[bytes] = Counter()

    def __call__(self, chunk_id: bytes) -> Location | None:
        self.calls[chunk_id] += 1
        return self.index.get(chunk_id)


def check_plans(disk: Disk, plans: list[WindowPlan], window: int) -> None:
    covered: Counter[int] = Counter()
    expect_first = 0
    for plan in plans:
        assert plan.first_slot == expect_first
        assert plan.slot_count == min(window, len(disk.ids) - plan.first_slot)
        expect_first += plan.slot_count
        in_window = range(plan.first_slot, plan.first_slot + plan.slot_count)
        zero_slots = [s for run in plan.zero_runs for s in range(run.start, run.start + run.count)]
        assert all(disk.ids[s] == ZERO_ID for s in zero_slots)
        # Runs are maximal: separated by at least one data slot.
        for a, b in zip(plan.zero_runs, plan.zero_runs[1:], strict=False):
            assert a.start + a.count < b.start
        covered.update(zero_slots)
        seen_ids: set[bytes] = set()
        packs = [group.pack for group in plan.packs]
        assert len(packs) == len(set(packs)), "a pack appears twice in one window"
        for group in plan.packs:
            offsets = [r.offset for r in group.reads]
            assert offsets == sorted(offsets)
            assert len(offsets) == len(set(offsets))
            for read in group.reads:
                assert read.pack == group.pack
                assert read.location == disk.index[read.chunk_id]
                assert read.chunk_id not in seen_ids, "an id is read twice in one window"
                seen_ids.add(read.chunk_id)
                assert list(read.slots) == sorted(read.slots)
                assert all(s in in_window and disk.ids[s] == read.chunk_id for s in read.slots)
                covered.update(read.slots)
        assert plan.read_count == len(seen_ids) == len(list(plan.reads()))
    assert expect_first == len(disk.ids)
    assert covered == Counter(range(len(disk.ids))), "every slot exactly once"


@settings(max_examples=200, deadline=None)
@given(disk=disks(), window=st.integers(1, 40), block=st.integers(1, 50))
def test_plans_cover_every_slot_once_in_pack_order(disk: Disk, window: int, block: int) -> None:
    lookup = CountingLookup(disk.index)
    plans = list(plan_disk(disk.blocks(block), lookup, disk.geometry, window))
    check_plans(disk, plans, window)
    # One lookup per distinct data id per window it appears in, never more.
    for plan in plans:
        for read in plan.reads():
            assert lookup.calls[read.chunk_id] <= len(plans)
    per_window = Counter(r.chunk_id for p in plans for r in p.reads())
    assert lookup.calls == per_window


@settings(max_examples=100, deadline=None)
@given(disk=disks(), window=st.integers(1, 40), data=st.data())
def test_missing_chunk_names_the_first_slot_needing_it(
    disk: Disk, window: int, data: st.DataObject
) -> None:
    present = [i for i in dict.fromkeys(disk.ids) if i != ZERO_ID]
    assume(present)
    gone = data.draw(st.sampled_from(present))
    del disk.index[gone]
    first = disk.ids.index(gone)
    with pytest.raises(ChunkMissing) as info:
        list(plan_disk(disk.blocks(7), disk.index.get, disk.geometry, window))
    err = info.value
    assert err.fields["chunk"] == short(gone)
    assert err.fields["disk"] == "disk-a"
    assert err.fields["slot"] == first
    assert err.fields["offset"] == first * CHUNK
    assert f"slot {first}" in str(err)
    assert "disk-a" in str(err)


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), max_size=20),
    window=st.integers(1, 10),
)
def test_windows_recut_any_blocks(sizes: list[int], window: int) -> None:
    raw = b"".join(cid(n) for n in range(sum(sizes)))
    blocks, pos = [], 0
    for n in sizes:
        blocks.append(raw[pos : pos + n * CHUNK_ID_SIZE])
        pos += n * CHUNK_ID_SIZE
    out = list(windows(blocks, window))
    assert b"".join(ids for _, ids in out) == raw
    assert [first for first, _ in out] == list(range(0, sum(sizes), window))
    assert all(len(ids) == window * CHUNK_ID_SIZE for _, ids in out[:-1])


def test_repeated_chunk_is_read_once_with_all_its_slots() -> None:
    a, b = cid(1), cid(2)
    ids = [a, ZERO_ID, a, b, a, ZERO_ID, ZERO_ID, b]
    geometry = DiskGeometry("tmpl", len(ids) * CHUNK, CHUNK)
    index = {a: Location("p1", 500, 10, CHUNK), b: Location("p1", 100, 10, CHUNK)}
    (plan,) = plan_disk([b"".join(ids)], index.get, geometry)
    assert plan.zero_runs == (SlotRun(1, 1), SlotRun(5, 2))
    (group,) = plan.packs
    assert [(r.chunk_id, r.slots) for r in group.reads] == [(b, (3, 7)), (a, (0, 2, 4))]


def test_packs_come_in_order_of_first_need() -> None:
    ids = [cid(1), cid(2), cid(3)]
    index = {
        cid(1): Location("zz", 9, 1, CHUNK),
        cid(2): Location("aa", 5, 1, CHUNK),
        cid(3): Location("zz", 2, 1, CHUNK),
    }
    plan = plan_window(0, b"".join(ids), index.get, DiskGeometry("d", 3 * CHUNK, CHUNK))
    assert [(g.pack, [r.offset for r in g.reads]) for g in plan.packs] == [
        ("zz", [2, 9]),
        ("aa", [5]),
    ]


def test_short_last_slot_and_zero_run_spans_are_clipped() -> None:
    geometry = DiskGeometry("d", 3 * CHUNK - 100, CHUNK)
    assert geometry.slots == 3
    assert geometry.slot_length(2) == CHUNK - 100
    assert geometry.run_span(SlotRun(1, 2)) == (CHUNK, 2 * CHUNK - 100)


def test_chunk_of_the_wrong_length_is_a_corrupt_record() -> None:
    ids = [cid(1), cid(1)]
    geometry = DiskGeometry("d", 2 * CHUNK - 1, CHUNK)  # the shared chunk cannot fit slot 1
    index = {cid(1): Location("p", 24, 90, CHUNK)}
    with pytest.raises(CorruptRecord) as info:
        plan_window(0, b"".join(ids), index.get, geometry)
    assert info.value.fields["pack"] == "p"
    assert info.value.fields["offset"] == 24
    assert "slot 1 needs 65535" in str(info.value)


def test_id_stream_must_match_the_disk() -> None:
    geometry = DiskGeometry("d", 4 * CHUNK, CHUNK)
    with pytest.raises(ValueError, match="3 slots"):
        list(plan_disk([ZERO_ID * 3], dict[bytes, Location]().get, geometry))
    with pytest.raises(ValueError, match="partial id"):
        list(windows([ZERO_ID + b"x"]))
    with pytest.raises(ValueError, match="outside"):
        plan_window(3, ZERO_ID * 2, dict[bytes, Location]().get, geometry)


def test_planning_is_lazy_and_bounded_by_the_window() -> None:
    """A huge disk is planned one window at a time: blocks are pulled only as needed."""
    slots = 1000 * WINDOW_SLOTS  # 4 TiB of disk at 1 MiB chunks
    geometry = DiskGeometry("huge", slots * CHUNK, CHUNK)
    pulled = 0

    def blocks() -> Iterator[bytes]:
        nonlocal pulled
        for _ in range(slots // 1024):
            pulled += 1
            yield ZERO_ID * 1024

    plans = plan_disk(blocks(), dict[bytes, Location]().get, geometry)
    first = next(plans)
    assert first.zero_runs == (SlotRun(0, WINDOW_SLOTS),)
    assert pulled == WINDOW_SLOTS // 1024
