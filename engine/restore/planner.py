"""Restore planning: which records to read, in which order, to fill which slots of a disk.

A restore walks a disk's DiskMap in *windows* of ``WINDOW_SLOTS`` consecutive slots. For
each window the planner returns a ``WindowPlan``::

    DiskMap ids ─► windows of WINDOW_SLOTS ids ─► plan_window ─► WindowPlan
                                                                  ├─ zero_runs: maximal runs of
                                                                  │  ZERO slots (never read)
                                                                  ├─ unchanged_runs: slots whose
                                                                  │  id equals the base's (only
                                                                  │  with a base: never read,
                                                                  │  never written)
                                                                  └─ packs: one PackReads per
                                                                     pack, in order of the first
                                                                     slot that needs it; its
                                                                     reads sorted by offset

Each ``Read`` is one distinct chunk of the window with every slot of the window that holds
it, so a chunk repeated inside a disk (a template VM's blocks, filler patterns) is read and
decoded once per window and written to all its slots. Reads inside a pack ascend, so a pack
is read front to back.

With a *base* (the ids of the same disk in the snapshot the target already holds, e.g. a
standby disk refreshed from its previous snapshot), a slot whose id equals the base's id at
the same slot is *unchanged*: it is left out of both the zero runs and the reads. Slots past
the base's end (the disk grew) are planned as without a base.

Pure: no I/O except through the ``lookup`` callable the caller passes (in a restore,
``store.locate``, which is blocking: call the planner from an executor thread).
Memory is one window's plan — at most ``WINDOW_SLOTS`` ids, locations and slot numbers —
whatever the disk size; ``plan_disk`` is a lazy iterator over the id blocks it is given.

Raised:

- ``ChunkMissing`` when a data slot's chunk is not in the store; its fields name the chunk,
  the disk, and the first slot (and byte offset) of the window that needs it.
- ``CorruptRecord`` when the store's record of a chunk holds a plaintext length that differs
  from the slot it must fill (names chunk, pack, offset); writing it would shift the disk.
- ``ValueError`` for a caller's mistake: an id stream whose length is not whole ids or does
  not match the disk's slot count.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from engine.core.errors import ChunkMissing, CorruptRecord
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, ChunkId, short
from engine.store.index import Location

# Slots planned at once. A window's plan holds one Location, one Read and a slot list per
# distinct chunk (a few hundred bytes each), so 4096 slots cost about 1 MiB of Python
# objects whatever the disk size, while spanning 4 GiB of disk at the default 1 MiB chunk
# size: long enough that each pack's records are read in long ascending runs and a template
# VM's repeated blocks inside that span are read once.
WINDOW_SLOTS: Final = 4096

Lookup = Callable[[bytes], Location | None]


@dataclass(frozen=True, slots=True)
class DiskGeometry:
    """Where slots fall on a disk: slot i is ``[i·chunk_size, min((i+1)·chunk_size, size))``."""

    disk_id: str
    disk_size: int
    chunk_size: int

    @property
    def slots(self) -> int:
        return -(-self.disk_size // self.chunk_size)

    def slot_offset(self, slot: int) -> int:
        return slot * self.chunk_size

    def slot_length(self, slot: int) -> int:
        """Bytes of ``slot`` (the last slot may be shorter than the chunk size)."""
        return min(self.chunk_size, self.disk_size - slot * self.chunk_size)

    def run_span(self, run: "SlotRun") -> tuple[int, int]:
        """(byte offset, byte length) of a run of slots, clipped to the disk size."""
        start = run.start * self.chunk_size
        end = min((run.start + run.count) * self.chunk_size, self.disk_size)
        return start, end - start


@dataclass(frozen=True, slots=True)
class SlotRun:
    """``count`` consecutive slots from ``start`` (absolute slot numbers)."""

    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Read:
    """One record to read and decode once, and every slot of the window it fills."""

    chunk_id: ChunkId
    location: Location
    slots: tuple[int, ...]  # ascending, absolute slot numbers

    @property
    def pack(self) -> str:
        return self.location.pack

    @property
    def offset(self) -> int:
        return self.location.offset


@dataclass(frozen=True, slots=True)
class PackReads:
    pack: str
    reads: tuple[Read, ...]  # ascending offset


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """The plan of slots ``[first_slot, first_slot + slot_count)``."""

    first_slot: int
    slot_count: int
    zero_runs: tuple[SlotRun, ...]  # maximal runs of ZERO slots, ascending
    packs: tuple[PackReads, ...]  # in order of the first slot that needs each pack
    unchanged_runs: tuple[SlotRun, ...] = ()  # slots equal to the base's, ascending

    def reads(self) -> Iterator[Read]:
        """Every read of the window, pack by pack, each pack front to back."""
        for group in self.packs:
            yield from group.reads

    @property
    def read_count(self) -> int:
        return sum(len(group.reads) for group in self.packs)


def windows(
    blocks: Iterable[bytes], window_slots: int = WINDOW_SLOTS
) -> Iterator[tuple[int, bytes]]:
    """Re-cut an id array given in blocks of any size into (first slot, ids) windows.

    Holds at most one window plus one block; every window but the last has exactly
    ``window_slots`` ids. ValueError if the ids do not add up to whole ids.
    """
    if window_slots < 1:
        raise ValueError(f"a window needs at least one slot, not {window_slots}")
    size = window_slots * CHUNK_ID_SIZE
    pending = bytearray()
    first = 0
    for block in blocks:
        pending += block
        while len(pending) >= size:
            yield first, bytes(pending[:size])
            del pending[:size]  # bytearray drops its front in O(1)
            first += window_slots
    if len(pending) % CHUNK_ID_SIZE:
        raise ValueError(f"id array ends with a partial id ({len(pending) % CHUNK_ID_SIZE} bytes)")
    if pending:
        yield first, bytes(pending)


def plan_window(
    first_slot: int,
    ids: bytes | memoryview,
    lookup: Lookup,
    geometry: DiskGeometry,
    base: bytes | memoryview | None = None,
) -> WindowPlan:
    """Plan one window whose ids (``CHUNK_ID_SIZE`` bytes per slot) start at ``first_slot``.

    ``base``: the base's ids for the same slots (it may be shorter: slots past its end are
    planned as changed); a slot equal to its base id is unchanged (module docstring).
    Calls ``lookup`` once per distinct data chunk, in order of first use; raises
    ChunkMissing / CorruptRecord as described in the module docstring.
    """
    count, partial = divmod(len(ids), CHUNK_ID_SIZE)
    if partial:
        raise ValueError(f"a window of {len(ids)} bytes is not whole ids")
    if first_slot < 0 or first_slot + count > geometry.slots:
        raise ValueError(
            f"window {first_slot}+{count} outside the {geometry.slots} slots "
            f"of disk {geometry.disk_id}"
        )
    zero_runs: list[SlotRun] = []
    unchanged: list[SlotRun] = []
    slots_of: dict[bytes, list[int]] = {}  # insertion order = order of first use
    run_start = -1
    same_start = -1
    base_slots = 0 if base is None else len(base) // CHUNK_ID_SIZE
    for i in range(count):
        slot = first_slot + i
        chunk_id = bytes(ids[i * CHUNK_ID_SIZE : (i + 1) * CHUNK_ID_SIZE])
        if (
            i < base_slots
            and base is not None
            and base[i * CHUNK_ID_SIZE : (i + 1) * CHUNK_ID_SIZE] == chunk_id
        ):
            if same_start < 0:
                same_start = slot
            if run_start >= 0:
                zero_runs.append(SlotRun(run_start, slot - run_start))
                run_start = -1
            continue
        if same_start >= 0:
            unchanged.append(SlotRun(same_start, slot - same_start))
            same_start = -1
        if chunk_id == ZERO_ID:
            if run_start < 0:
                run_start = slot
            continue
        if run_start >= 0:
            zero_runs.append(SlotRun(run_start, slot - run_start))
            run_start = -1
        slots_of.setdefault(chunk_id, []).append(slot)
    if run_start >= 0:
        zero_runs.append(SlotRun(run_start, first_slot + count - run_start))
    if same_start >= 0:
        unchanged.append(SlotRun(same_start, first_slot + count - same_start))

    by_pack: dict[str, list[Read]] = {}  # insertion order = order of the first slot needing it
    for chunk_id, slots in slots_of.items():
        location = lookup(chunk_id)
        first = slots[0]
        if location is None:
            offset = geometry.slot_offset(first)
            raise ChunkMissing(
                chunk=short(chunk_id),
                context=f" (needed by disk {geometry.disk_id} slot {first} at offset {offset})",
                disk=geometry.disk_id,
                slot=first,
                offset=offset,
            )
        for slot in (first, slots[-1]):  # only the disk's last slot can be short
            need = geometry.slot_length(slot)
            if location.plain_len != need:
                raise CorruptRecord(
                    chunk=short(chunk_id),
                    pack=location.pack,
                    offset=location.offset,
                    reason=f"holds {location.plain_len} plaintext bytes but disk "
                    f"{geometry.disk_id} slot {slot} needs {need}",
                )
        by_pack.setdefault(location.pack, []).append(
            Read(ChunkId(chunk_id), location, tuple(slots))
        )
    packs = tuple(
        PackReads(pack, tuple(sorted(reads, key=lambda r: r.location.offset)))
        for pack, reads in by_pack.items()
    )
    return WindowPlan(first_slot, count, tuple(zero_runs), packs, tuple(unchanged))


def plan_disk(
    blocks: Iterable[bytes],
    lookup: Lookup,
    geometry: DiskGeometry,
    window_slots: int = WINDOW_SLOTS,
    base: Iterable[bytes] | None = None,
) -> Iterator[WindowPlan]:
    """Lazily plan a whole disk from its id array (e.g. ``DiskMap.iter_blocks()``).

    ``base``: the base's id array in blocks (e.g. the previous snapshot's
    ``DiskMap.iter_blocks()``), read window by window alongside; ids past the disk's end
    are ignored. ValueError, after the last window, if the ids do not cover exactly the
    disk's slots.
    """
    covered = 0
    base_windows: Iterator[tuple[int, bytes]] = iter(())
    if base is not None:
        base_windows = windows(base, window_slots)
    for first, ids in windows(blocks, window_slots):
        base_ids = next(base_windows, None)
        plan = plan_window(first, ids, lookup, geometry, base_ids[1] if base_ids else None)
        covered += plan.slot_count
        yield plan
    if covered != geometry.slots:
        raise ValueError(
            f"id array has {covered} slots; disk {geometry.disk_id} of {geometry.disk_size} "
            f"bytes has {geometry.slots}"
        )
