"""Slot decisions for one window of a disk (pure).

A slot is ZERO when zero extents cover every byte of it, CLEAN when a parent exists and no
dirty extent touches it (its id is reused from the parent's DiskMap), READ otherwise. A dirty
slot that is now all zero is ZERO: discarded data needs no read either.
"""

from collections.abc import Sequence
from enum import Enum

from engine.core.extent import Extent


class Slot(Enum):
    ZERO = "zero"
    CLEAN = "clean"
    READ = "read"


def classify(
    first_slot: int,
    count: int,
    chunk_size: int,
    disk_size: int,
    zero: Sequence[Extent],
    dirty: Sequence[Extent] | None,
) -> list[Slot]:
    """Decisions for slots ``first_slot .. first_slot+count-1``.

    ``zero`` lists extents with ``zero=True`` (others are ignored); ``dirty`` is None for a
    full read, else the extents with ``dirty=True`` since the parent checkpoint.
    """
    out: list[Slot] = []
    zeros = sorted((e for e in zero if e.zero), key=lambda e: e.start)
    dirties = (
        sorted((e for e in dirty if e.dirty), key=lambda e: e.start) if dirty is not None else None
    )
    zi = di = 0
    for slot in range(first_slot, first_slot + count):
        start = slot * chunk_size
        end = min(start + chunk_size, disk_size)
        # Zero coverage: walk the zero extents that overlap this slot.
        while zi < len(zeros) and zeros[zi].start + zeros[zi].length <= start:
            zi += 1
        pos, j = start, zi
        while j < len(zeros) and zeros[j].start <= pos < end:
            pos = max(pos, zeros[j].start + zeros[j].length)
            j += 1
        if pos >= end:
            out.append(Slot.ZERO)
            continue
        if dirties is None:
            out.append(Slot.READ)
            continue
        while di < len(dirties) and dirties[di].start + dirties[di].length <= start:
            di += 1
        touched = di < len(dirties) and dirties[di].start < end
        out.append(Slot.READ if touched else Slot.CLEAN)
    return out
