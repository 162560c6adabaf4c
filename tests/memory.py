"""An in-memory Source and restore Target, for unit tests and the contract suites.

They implement the protocols of ``engine.sources.types`` the way the real plugins do, with
the disks held as bytes, so the backup and restore pipelines can be tested without qemu-nbd
or an engine. The product does not ship them.

Source::

    vm = MemoryVm("vm-1", "web", [MemoryDisk("d1", "web_os", data)], config=b"{...}")
    source = MemorySource(vm)              # a ``Source``; plugin name "memory"
    vm.write("d1", offset, b"...")         # a guest write between backups (marks bitmaps)

- ``open(parent, keep, new, readers, record)`` takes a point-in-time copy of every disk (as a
  snapshot or a backup does), journals ``bitmaps_added`` (the disks that get a bitmap) before
  adding bitmap ``new`` to every disk that keeps checkpoints (``MemoryDisk.checkpoints``).
  A disk that keeps none (as a raw image), or lacks the parent's bitmap, is a full read with
  ``fallback_reason`` saying why; otherwise ``checkpoint_parent`` is the parent and
  ``dirty_extents`` lists exactly the bytes written since it was created.
- ``extents`` reports ``zero`` for every ``ZERO_BLOCK``-aligned piece that holds only zero
  bytes (exact, not allocation: a bytearray has none, so ``hole`` is never set), or nothing
  zero for a disk made with ``zero_extents=False``.
- Extent lists are sorted, contiguous, merged and clipped to the range asked, as
  ``engine.core.extent`` says; a range outside the disk is a ``ValueError`` (as the NBD
  client's).
- ``release()`` is idempotent; a disk refuses every call after it (``RuntimeError``), as an
  oVirt disk whose transfer was finalized does.
- ``close(success)`` releases what the job did not; on success it drops every bitmap but the
  new one and ``keep``; on failure it drops the new one, so the parent stays valid.

Target::

    targets = MemoryTargets()
    await run_restore(..., plugin="memory", make_target=targets.make_target, ...)
    targets.published["d1"]                # the restored bytes, by the snapshot's disk id

- ``make_target(entry, record)`` journals ``memory_targets`` (the disks being written) and
  gives a fresh ``TargetDisk`` of ``entry.size`` zero bytes; leaving its context normally
  publishes the bytes under ``entry.disk_id``, leaving it by an exception (or cancellation)
  throws them away, as the local target deletes its partial image (``fresh = False``: its
  disks say they hold old data, so zero slots get ``write_zeroes``). A disk id already
  published is refused (``ConfigError``): nothing is ever overwritten.
- Writers check their bounds (``ValueError``) and refuse requests once closed
  (``RuntimeError``); ``close`` is idempotent.

Observation and faults (for tests): every read, extents call and write is logged on its
disk (``MemoryDisk.reads``, ``extent_calls``, ``dirty_calls``; ``MemoryTargetDisk.writes``,
``zeroes``); ``MemoryDisk.before_read`` and ``MemoryTargets.before_write`` are awaited before
every read or write request and may raise (a failing connection) or wait (a slow one).
``open_readers`` / ``open_writers`` count connections not yet closed.
"""

import bisect
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final

from engine.core.errors import ConfigError
from engine.core.extent import Extent
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, TargetDisk, VmInfo
from engine.store.manifest import DiskEntry

PLUGIN: Final = "memory"
# Zero detection granularity: a real source reports allocation at cluster granularity
# (64 KiB in qcow2); a page is finer, so tests see zero runs inside slots too.
ZERO_BLOCK: Final = 4096

ReadHook = Callable[["MemoryDisk", int, int], Awaitable[None]]
WriteHook = Callable[["MemoryTargetDisk", int, int], Awaitable[None]]


class Ranges:
    """A set of byte ranges, kept as sorted, disjoint, non-adjacent ``(start, end)`` pairs."""

    def __init__(self, spans: Iterable[tuple[int, int]] = ()) -> None:
        self._spans: list[tuple[int, int]] = []
        for start, end in spans:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._spans, (start, start))
        if i > 0 and self._spans[i - 1][1] >= start:  # touches the previous span
            i -= 1
        j = i
        while j < len(self._spans) and self._spans[j][0] <= end:
            start, end = min(start, self._spans[j][0]), max(end, self._spans[j][1])
            j += 1
        self._spans[i:j] = [(start, end)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._spans))

    def __len__(self) -> int:
        return len(self._spans)

    def copy(self) -> "Ranges":
        return Ranges(self._spans)

    @property
    def total(self) -> int:
        return sum(end - start for start, end in self._spans)


def flagged_extents(
    offset: int, length: int, spans: Iterable[tuple[int, int]], flag: str
) -> list[Extent]:
    """Extents covering ``[offset, offset + length)``: ``flag`` ("zero" or "dirty") set inside
    ``spans`` (sorted, disjoint), clear outside; merged and clipped to the range."""
    end = offset + length
    out: list[Extent] = []

    def put(start: int, stop: int, flagged: bool) -> None:
        if stop <= start:
            return
        if out and getattr(out[-1], flag) == flagged:
            last = out.pop()
            start = last.start
        out.append(Extent(start, stop - start, **{flag: flagged}))

    pos = offset
    for span_start, span_end in spans:
        s, e = max(span_start, offset), min(span_end, end)
        if e <= s:
            continue
        put(pos, s, False)
        put(s, e, True)
        pos = e
    put(pos, end, False)
    return out


def _check_range(what: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{what}: range [{offset}, {offset + length}) is outside {size} bytes")


# --- the source -------------------------------------------------------------------------------


@dataclass(eq=False)
class MemoryDisk:
    """One disk of a ``MemoryVm``: its bytes, and one bitmap per checkpoint it keeps.

    ``checkpoints`` False makes it a disk without bitmaps (as a raw image): every backup of
    it is a full read. The log lists and hooks are the tests' (module docstring)."""

    disk_id: str
    name: str
    data: bytearray
    attributes: dict[str, str] = field(default_factory=dict)
    checkpoints: bool = True
    # False: ``extents`` never reports zero (as a device attached to the DataMover): the
    # pipeline finds zero slots only by reading them.
    zero_extents: bool = True
    bitmaps: dict[str, Ranges] = field(default_factory=dict)  # checkpoint → written since
    before_read: ReadHook | None = None
    reads: list[tuple[int, int]] = field(default_factory=list)  # (offset, length)
    extent_calls: list[tuple[int, int]] = field(default_factory=list)
    dirty_calls: list[tuple[int, int]] = field(default_factory=list)
    open_readers: int = 0
    readers_opened: int = 0

    def __post_init__(self) -> None:
        self.data = bytearray(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: the bytes change and every bitmap marks the range."""
        _check_range(f"disk {self.name}", offset, len(data), self.size)
        self.data[offset : offset + len(data)] = data
        for bitmap in self.bitmaps.values():
            bitmap.add(offset, offset + len(data))


@dataclass(eq=False)
class MemoryVm:
    """A VM: its disks, its configuration stream and what it tells about consistency."""

    vm_id: str
    name: str
    disks: list[MemoryDisk]
    config: bytes | None = None
    config_format: str = "json"
    consistency: str | None = "crash"
    skipped: tuple[tuple[str, str], ...] = ()
    sessions: list["MemorySession"] = field(default_factory=list)  # every session opened

    def disk(self, disk: str) -> MemoryDisk:
        """The disk with this id or name."""
        for d in self.disks:
            if disk in (d.disk_id, d.name):
                return d
        raise KeyError(disk)

    def write(self, disk: str, offset: int, data: bytes) -> None:
        """A guest write to the disk with this id or name (``MemoryDisk.write``)."""
        self.disk(disk).write(offset, data)

    @property
    def open_readers(self) -> int:
        return sum(d.open_readers for d in self.disks)


class MemoryReader:
    """A ``DiskReader`` over one session's copy of a disk."""

    def __init__(self, disk: "MemorySourceDisk") -> None:
        self._disk = disk
        self.closed = False

    async def readinto(self, offset: int, buf: memoryview) -> None:
        disk = self._disk
        if self.closed:
            raise RuntimeError(f"disk {disk.info.name}: read on a closed reader")
        disk.check_usable()
        _check_range(f"disk {disk.info.name}", offset, len(buf), disk.info.size)
        if disk.image.before_read is not None:
            await disk.image.before_read(disk.image, offset, len(buf))
            if self.closed:  # as a real connection closed under a read in flight
                raise RuntimeError(f"disk {disk.info.name}: reader closed during a read")
        buf[:] = disk.content[offset : offset + len(buf)]
        disk.image.reads.append((offset, len(buf)))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._disk.image.open_readers -= 1


class MemorySourceDisk:
    """A ``SourceDisk``: one session's point-in-time copy of a ``MemoryDisk``."""

    def __init__(
        self,
        image: MemoryDisk,
        info: DiskInfo,
        parent: str | None,
        reason: str | None,
        dirty: Ranges | None,
    ) -> None:
        self.info = info
        self.checkpoint_parent = parent
        self.fallback_reason = reason
        self.image = image
        self.content = bytes(image.data)
        self.released = 0  # calls of release()
        self._dirty = dirty
        self._zero_cache: Ranges | None = None

    def check_usable(self) -> None:
        if self.released:
            raise RuntimeError(f"disk {self.info.name}: used after release")

    def _zero_spans(self) -> Ranges:
        if self._zero_cache is None:
            data, spans = self.content, Ranges()
            for start in range(0, len(data), ZERO_BLOCK):
                end = min(start + ZERO_BLOCK, len(data))
                if data.count(0, start, end) == end - start:
                    spans.add(start, end)
            self._zero_cache = spans
        return self._zero_cache

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        self.check_usable()
        _check_range(f"disk {self.info.name} extents", offset, length, self.info.size)
        self.image.extent_calls.append((offset, length))
        zero = self._zero_spans() if self.image.zero_extents else Ranges()
        return flagged_extents(offset, length, zero, "zero")

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        self.check_usable()
        if self._dirty is None:
            raise RuntimeError(f"disk {self.info.name}: dirty extents of a full read")
        _check_range(f"disk {self.info.name} dirty extents", offset, length, self.info.size)
        self.image.dirty_calls.append((offset, length))
        return flagged_extents(offset, length, self._dirty, "dirty")

    async def open_reader(self) -> MemoryReader:
        self.check_usable()
        self.image.open_readers += 1
        self.image.readers_opened += 1
        return MemoryReader(self)

    async def release(self) -> None:
        """Idempotent; the disk refuses every call afterwards."""
        self.released += 1


class MemorySession:
    """A ``BackupSession`` of a ``MemorySource``; ``closed`` holds each close's ``success``,
    ``unreleased_at_close`` the disks ``close`` had to release."""

    def __init__(
        self, vm: MemoryVm, info: VmInfo, disks: list[MemorySourceDisk], new: str, keep: set[str]
    ) -> None:
        self._vm = vm
        self._info = info
        self._disks = disks
        self._new = new
        self._keep = keep
        self.closed: list[bool] = []
        self.unreleased_at_close: list[str] = []  # disk ids the job had not released

    @property
    def vm(self) -> VmInfo:
        return self._info

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self._disks

    @property
    def memory_disks(self) -> Sequence[MemorySourceDisk]:
        return self._disks

    @property
    def checkpoint(self) -> str | None:
        """The new checkpoint, or None when no disk of the VM keeps checkpoints."""
        return self._new if any(d.checkpoints for d in self._vm.disks) else None

    @property
    def consistency(self) -> str | None:
        return self._vm.consistency

    async def close(self, success: bool) -> None:
        """Release what the job did not; then drop stale bitmaps (success) or the new one."""
        self.closed.append(success)
        self.unreleased_at_close = [d.info.disk_id for d in self._disks if not d.released]
        for disk in self._disks:
            await disk.release()
        keep = self._keep | {self._new}
        for image in self._vm.disks:
            for name in list(image.bitmaps):
                if (success and name not in keep) or (not success and name == self._new):
                    del image.bitmaps[name]


class MemorySource:
    """A ``Source`` over a ``MemoryVm`` (module docstring)."""

    plugin = PLUGIN

    def __init__(self, vm: MemoryVm) -> None:
        self.vm = vm
        self.vm_id = vm.vm_id
        self.vm_name = vm.name

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> MemorySession:
        vm = self.vm
        infos = tuple(DiskInfo(d.disk_id, d.name, d.size, dict(d.attributes)) for d in vm.disks)
        disks = []
        for image, info in zip(vm.disks, infos, strict=True):
            parent, reason, dirty = None, None, None
            if parent_checkpoint is not None:
                if not image.checkpoints:
                    reason = f"disk {image.name} keeps no checkpoints: full read"
                elif parent_checkpoint not in image.bitmaps:
                    reason = f"checkpoint {parent_checkpoint} is missing: full read"
                else:
                    parent, dirty = parent_checkpoint, image.bitmaps[parent_checkpoint].copy()
            disks.append(MemorySourceDisk(image, info, parent, reason, dirty))
        tracked = [d for d in vm.disks if d.checkpoints]
        await record("bitmaps_added", [d.disk_id for d in tracked])  # before they exist
        for image in tracked:
            image.bitmaps[new_checkpoint] = Ranges()
        config = VmInfo(vm.vm_id, vm.name, infos, vm.config, vm.config_format, vm.skipped)
        session = MemorySession(vm, config, disks, new_checkpoint, set(keep_checkpoints))
        vm.sessions.append(session)
        return session


# --- the target -------------------------------------------------------------------------------


class MemoryWriter:
    """A ``DiskWriter`` into a ``MemoryTargetDisk``."""

    def __init__(self, disk: "MemoryTargetDisk") -> None:
        self._disk = disk
        self.closed = False
        self.flushed = False  # a flush came after this writer's last write

    async def _request(self, offset: int, length: int) -> None:
        disk = self._disk
        if self.closed:
            raise RuntimeError(f"target {disk.info.name}: request on a closed writer")
        _check_range(f"target {disk.info.name}", offset, length, disk.info.size)
        if disk.targets.before_write is not None:
            await disk.targets.before_write(disk, offset, length)
        self.flushed = False

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._request(offset, len(data))
        self._disk.data[offset : offset + len(data)] = data
        self._disk.writes.append((offset, len(data)))

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._request(offset, length)
        self._disk.data[offset : offset + length] = bytes(length)
        self._disk.zeroes.append((offset, length))

    async def flush(self) -> None:
        if self.closed:
            raise RuntimeError(f"target {self._disk.info.name}: flush on a closed writer")
        self.flushed = True

    async def close(self) -> None:
        """Idempotent."""
        if not self.closed:
            self.closed = True
            self._disk.open_writers -= 1


class MemoryTargetDisk:
    """A fresh ``TargetDisk`` of zero bytes, made by ``targets``; the request logs are the
    tests'."""

    def __init__(self, info: DiskInfo, targets: "MemoryTargets") -> None:
        self.info = info
        self.fresh = targets.fresh
        self.data = bytearray(info.size)
        self.targets = targets
        self.writers: list[MemoryWriter] = []
        self.open_writers = 0
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []

    async def open_writer(self) -> MemoryWriter:
        writer = MemoryWriter(self)
        self.writers.append(writer)
        self.open_writers += 1
        return writer


class MemoryTargets:
    """``make_target`` for ``run_restore``: disks restored into bytearrays (module docstring)."""

    def __init__(self) -> None:
        self.published: dict[str, bytes] = {}  # snapshot disk id → restored bytes
        self.disks: list[MemoryTargetDisk] = []  # every target made, published or not
        self.discarded: list[str] = []  # disk ids whose target was left by an exception
        self.before_write: WriteHook | None = None
        self.fresh = True  # False: the disks count as holding old data (zero slots written)

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        return self._target(entry, record)

    @contextlib.asynccontextmanager
    async def _target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AsyncIterator[MemoryTargetDisk]:
        if entry.disk_id in self.published:
            raise ConfigError(message=f"memory target {entry.disk_id} exists already")
        writing = [d.info.disk_id for d in self.disks] + [entry.disk_id]
        await record("memory_targets", writing)  # before it exists
        disk = MemoryTargetDisk(
            DiskInfo(entry.disk_id, entry.name, entry.size, dict(entry.attributes)), self
        )
        self.disks.append(disk)
        try:
            yield disk
        except BaseException:
            self.discarded.append(entry.disk_id)
            raise
        self.published[entry.disk_id] = bytes(disk.data)
