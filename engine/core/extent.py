"""Extents: byte ranges of a disk with the flags a source reports for them.

An ``Extent`` is ``[start, start + length)`` with three independent flags:

- ``zero``   the range reads as zeroes (NBD ``base:allocation`` NBD_STATE_ZERO);
- ``hole``   the range is not allocated in the image (NBD_STATE_HOLE); a hole usually also
             reads as zeroes, but only ``zero`` promises it;
- ``dirty``  the range changed since a checkpoint (``qemu:dirty-bitmap:NAME`` flag 1).

A source reports one kind of information per list: allocation extents never set ``dirty``,
dirty-bitmap extents never set ``zero`` or ``hole``. Lists are sorted, contiguous, and
neighbours differ in their flags (they are merged). ``length`` is always positive.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    start: int
    length: int
    zero: bool = False
    hole: bool = False
    dirty: bool = False

    def __post_init__(self) -> None:
        if self.start < 0 or self.length <= 0:
            raise ValueError(f"extent start={self.start} length={self.length}: empty or negative")

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.start + self.length

    def same_flags(self, other: "Extent") -> bool:
        return (self.zero, self.hole, self.dirty) == (other.zero, other.hole, other.dirty)
