"""Slot classification from zero and dirty extents."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.extent import Extent
from engine.pipeline.slots import Slot, classify

C = 100  # a tiny "chunk size" keeps the arithmetic visible


def test_full_read_zero_and_data() -> None:
    zero = [Extent(0, 250, zero=True), Extent(250, 100), Extent(350, 150, zero=True)]
    assert classify(0, 5, C, 500, zero, None) == [
        Slot.ZERO,
        Slot.ZERO,
        Slot.READ,
        Slot.READ,
        Slot.ZERO,
    ]


def test_incremental_clean_dirty_and_discarded() -> None:
    zero = [Extent(0, 300), Extent(300, 100, zero=True), Extent(400, 100)]
    dirty = [
        Extent(0, 150, dirty=True),
        Extent(150, 150),
        Extent(300, 100, dirty=True),
        Extent(400, 100),
    ]
    # slot 3 is dirty but now zero (a discard): ZERO, not READ
    assert classify(0, 5, C, 500, zero, dirty) == [
        Slot.READ,
        Slot.READ,
        Slot.CLEAN,
        Slot.ZERO,
        Slot.CLEAN,
    ]


def test_short_last_slot_and_window_offset() -> None:
    zero = [Extent(300, 50, zero=True)]
    assert classify(3, 1, C, 350, zero, None) == [Slot.ZERO]
    assert classify(2, 2, C, 350, [Extent(200, 150)], [Extent(340, 10, dirty=True)]) == [
        Slot.CLEAN,
        Slot.READ,
    ]


@st.composite
def extent_lists(draw: st.DrawFn, size: int, flag: str) -> list[Extent]:
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=12))))
    bounds = [0, *cuts, size]
    return [Extent(a, b - a, **{flag: draw(st.booleans())}) for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), size=st.integers(2, 1500))
def test_matches_a_byte_by_byte_model(data: st.DataObject, size: int) -> None:
    zero = data.draw(extent_lists(size, "zero"))
    dirty = data.draw(st.none() | extent_lists(size, "dirty"))
    slots = -(-size // C)
    got = classify(0, slots, C, size, zero, dirty)
    is_zero = [any(e.zero and e.start <= b < e.end for e in zero) for b in range(size)]
    is_dirty = [
        dirty is None or any(e.dirty and e.start <= b < e.end for e in dirty) for b in range(size)
    ]
    for i in range(slots):
        rng = range(i * C, min((i + 1) * C, size))
        if all(is_zero[b] for b in rng):
            assert got[i] is Slot.ZERO
        elif dirty is not None and not any(is_dirty[b] for b in rng):
            assert got[i] is Slot.CLEAN
        else:
            assert got[i] is Slot.READ
