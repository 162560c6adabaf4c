"""Protocols and value types of sources and targets (see the package docstring)."""

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.core.extent import Extent


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a VM as the source describes it."""

    disk_id: str
    name: str
    size: int  # virtual size in bytes
    attributes: dict[str, str] = field(default_factory=dict)  # format, interface, bootable…


def disk_labels(disks: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Disk id → how people see the disk in progress bars, mails and messages: its name,
    with the id in parentheses when two of ``disks`` (id, name pairs) share that name (oVirt
    aliases need not be unique), or the id alone for a disk without a name."""
    pairs = list(disks)
    shared = Counter(name for _, name in pairs)
    return {
        disk_id: (name if shared[name] == 1 else f"{name} ({disk_id})") if name else disk_id
        for disk_id, name in pairs
    }


@dataclass(frozen=True)
class VmInfo:
    vm_id: str
    name: str
    disks: tuple[DiskInfo, ...]
    config: bytes | None = None  # the VM configuration (OVF, JSON…), saved as first stream
    config_format: str = "json"
    # Disks of the VM that no flow can read (a direct LUN, a shareable disk): (name, why).
    # The job records them in the manifest (tag ``skipped_disks``) and its notes.
    skipped: tuple[tuple[str, str], ...] = ()


class DiskReader(Protocol):
    """One connection to a disk; not shared between concurrent readers (except that its
    disk's ``reader_pipeline`` says how many ``readinto`` calls it takes at once)."""

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (short reads are the reader's problem)."""
        ...

    async def close(self) -> None: ...


class SourceDisk(Protocol):
    """A disk to back up. An optional int attribute ``reader_pipeline`` (default 1) says how
    many ``readinto`` calls one of its readers takes at once (pipelined requests on its
    connection); the backup pipeline then gives each reader that many lanes."""

    info: DiskInfo
    # None: read everything (full). Otherwise dirty_extents covers every changed byte.
    checkpoint_parent: str | None
    # Why a requested incremental became a full read of this disk (missing bitmap…), or None.
    fallback_reason: str | None

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        """Allocation extents covering [offset, offset+length): ``zero`` ones need no read."""
        ...

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        """Only when ``checkpoint_parent`` is set: ranges with ``dirty`` written since."""
        ...

    async def open_reader(self) -> DiskReader: ...

    async def release(self) -> None:
        """The job has finished reading this disk (or given up on it): the source may free
        what serves it now rather than at ``BackupSession.close`` (oVirt finalizes the disk's
        image transfer, which the engine would cancel if it sat idle while other disks are
        read). No call on the disk follows; idempotent; raises what freeing raised."""
        ...


class DiskWriter(Protocol):
    """One connection to a target disk."""

    async def write(self, offset: int, data: bytes | memoryview) -> None: ...

    async def write_zeroes(self, offset: int, length: int) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class TargetDisk(Protocol):
    info: DiskInfo
    fresh: bool  # a new sparse disk: zero slots need no write at all

    async def open_writer(self) -> DiskWriter: ...


class BackupSession(Protocol):
    """A VM's disks opened for one backup run (exports started, checkpoint created)."""

    @property
    def vm(self) -> VmInfo: ...

    @property
    def disks(self) -> Sequence[SourceDisk]: ...

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint this run created (recorded in the manifest for the next
        incremental): the name the job proposed, or the one the engine assigned."""
        ...

    @property
    def consistency(self) -> str | None:
        """``application`` (filesystems frozen by a guest agent), ``crash``, ``offline``
        (the VM was not running), or None when the source cannot tell."""
        ...

    async def close(self, success: bool) -> None:
        """Stop exports; on success drop checkpoints no longer needed, else the new one."""
        ...


class Source(Protocol):
    """One VM that can be backed up, as a plugin presents it."""

    plugin: str  # registry name, recorded in the job journal for crash recovery
    vm_id: str
    vm_name: str

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: "ResourceRecorder",
    ) -> BackupSession:
        """Export the disks for reading. With ``parent_checkpoint``, disks whose checkpoint
        is intact read only what changed since (``SourceDisk.checkpoint_parent``); others
        fall back to a full read with ``fallback_reason``. ``keep_checkpoints`` survive a
        successful close besides the new one (the last full's, for differentials)."""
        ...


class ResourceRecorder(Protocol):
    """Persists what a plugin created (before it creates it) so a restarted process can
    undo it: ``await record(key, value)`` returns once the job journal holds it durably
    (written off the event loop). Await it before creating what it names."""

    async def __call__(self, key: str, value: object) -> None: ...
