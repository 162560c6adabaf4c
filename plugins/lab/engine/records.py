"""The records ``backup.Activity`` keeps: checkpoints, backups, snapshots, transfers, events.

Mutable dataclasses owned by the event loop; phases hold the REST spelling (``"ready"``,
``"finished_success"``). Dates are tz-aware (the SDK needs that, API-NOTES § 10.2).
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from engine.io import qemu

BACKUP_ACTIVE = frozenset({"initializing", "starting", "ready", "finalizing"})
TRANSFER_DONE = frozenset({"finished_success", "finished_failure", "finished_cleanup"})
DEFAULT_INACTIVITY_TIMEOUT = 60  # seconds: the engine's, for a transfer that asks for none

# Event codes (API-NOTES § 9.3).
VM_BACKUP_STARTED = 10790
VM_INCREMENTAL_BACKUP_FAILED_FULL_VM_BACKUP_NEEDED = 10791
VM_BACKUP_FAILED = 10792
VM_BACKUP_SUCCEEDED = 10793
VM_BACKUP_FINALIZED = 10794
VM_CHECKPOINT_DELETED = 10797
TRANSFER_INITIATED = 1031
TRANSFER_SUCCEEDED = 1032
TRANSFER_CANCELLED = 1033
TRANSFER_TICKET_FAILED = 1068
TRANSFER_DOWNLOAD_CANCELLED_TIMEOUT = 1072  # legacy policy, a download
TRANSFER_CANCELLED_TIMEOUT = 1076  # policy cancel
TRANSFER_PAUSED_TIMEOUT = 1077  # policy pause (or legacy, an upload)
SNAPSHOT_CREATED = 68  # USER_CREATE_SNAPSHOT_FINISHED_SUCCESS
SNAPSHOT_REMOVE_STARTED = 342
SNAPSHOT_REMOVED = 356


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Checkpoint:
    id: str  # also the name of the qcow2 bitmap in each of its disks
    vm_id: str
    parent_id: str | None
    disk_ids: tuple[str, ...]
    description: str | None
    created: datetime = field(default_factory=now)


@dataclass(slots=True)
class Backup:
    id: str
    vm_id: str
    host_id: str | None
    disk_ids: tuple[str, ...]
    modes: dict[str, str]  # disk id → "full" | "incremental"
    from_checkpoint_id: str | None
    to_checkpoint_id: str | None
    description: str | None
    phase: str = "initializing"
    created: datetime = field(default_factory=now)
    modified: datetime = field(default_factory=now)
    failure: str | None = None  # set: the backup goes initializing → failed (``faults``)
    chain_lost: bool = False  # the failure is a failed checkpoint redefine: event 10791 too
    since: float = 0.0  # ``Activity.clock.now()`` when the phase last changed (``monitor``)


@dataclass(slots=True)
class Transfer:
    id: str
    disk_id: str
    direction: str  # "download" | "upload"
    backup_id: str | None
    ticket: str
    url: str  # the imageio data URL of the ticket
    host_id: str | None
    inactivity_timeout: int
    timeout_policy: str
    nbd: qemu.QemuNbd | None  # None once released, or if it failed to start
    snapshot_volume: str | None = None  # a snapshot download: the volume (disk snapshot) id
    failure: str | None = None  # why qemu-nbd or the ticket failed: the transfer pauses
    phase: str = "initializing"
    since: float = 0.0  # ``Activity.clock.now()`` when the phase last changed (``monitor``)
    locks_disk: bool = False  # the disk shows ``locked`` until the transfer is finished


@dataclass(frozen=True, slots=True)
class Event:
    index: int
    code: int
    severity: str
    description: str
    vm_id: str | None
    time: datetime = field(default_factory=now)
    origin: str = "oVirt"  # the engine's own; ``POST events`` (``inventory_api``) names others
    custom_id: int = -1


@dataclass(frozen=True, slots=True)
class Volume:
    """A snapshot's volume of one disk: the file that was the disk's top at snapshot time
    (read-only since), and its format."""

    id: str  # the disk snapshot id (``<snapshot id>`` of an image transfer)
    disk_id: str
    path: Path
    fmt: str  # "qcow2" | "raw"


@dataclass(slots=True)
class Snapshot:
    id: str
    vm_id: str
    description: str
    ovf: str  # the VM's OVF at creation
    volumes: dict[str, Volume]  # disk id → volume
    persist_memorystate: bool = False
    status: str = "locked"  # locked → ok; deleting: locked → gone (``monitor``)
    deleting: bool = False
    since: float = 0.0  # ``Activity.clock.now()`` when the status last changed (``monitor``)
    created: datetime = field(default_factory=now)
