"""What a killed job left on the engine and the DataMover, cleaned up from its journal.

Every flow records what it creates before (ids it chooses itself) or right after (ids the
engine chooses) it exists, under these journal keys; ``recover`` undoes them in this order:

==========================  ======================================  =======================
key                         written by                              recovery
==========================  ======================================  =======================
``attach_exports``          ``attach_restore`` (each qemu-nbd's     stop the qemu-nbd
                            private directory); ``attach`` before   processes (by directory)
                            it read devices directly
``attachments``             ``attach``, ``attach_restore``          detach from the
                            ``{vm_id, disk_id}`` before each POST   DataMover
``standby_transfers``       ``standby`` (refresh uploads)           finalize, else cancel
                                                                    (the disk stays, dirty)
``transfers``               ``backup``, ``snapshot`` (downloads)    finalize, else cancel
``backup``                  ``backup`` (our own id, before POST)    finalize
``snapshot``                ``snapshots.create_snapshot``           remove (a merge)
``restore_vm``              ``restore`` (right after POST)          delete, keeping disks
``restore_transfers``       ``restore`` (uploads)                   cancel
``restore_disks``           ``restore`` (right after POST)          delete
==========================  ======================================  =======================

Exports and attachments go first: a snapshot or a new disk cannot be removed while it is
attached to the DataMover. The restored VM goes before its disks (they are attached to it).
``engine`` holds the credentials (``EngineConfig.record``); without it nothing on the engine
can be reached, and only the local exports are stopped.

``committed``: the job's snapshot was committed to the store before the process died; the
engine objects are cleaned up all the same (a committed backup's transfers and snapshot are
of no further use). A restore killed after its job succeeded but before its VM was created
is no longer unfinished, so its disks are the operator's to delete.

Every step is idempotent and runs even when an earlier one failed (``idempotent.Steps``):
``recover`` returns what it changed (``[]`` when everything already was cleaned up), or
raises ``OvirtRecoveryError`` naming every step that failed and what was done.
"""

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.io.exports import stop_exports
from plugins.ovirt.backups import finalize_backup
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.disks import delete_disk, delete_vm, detach_disk
from plugins.ovirt.idempotent import Steps
from plugins.ovirt.snapshots import remove_snapshot
from plugins.ovirt.transfers import cancel_transfer, end_transfer


@dataclass(frozen=True)
class _Undo:
    """How one journal key is undone on the engine. The key holds a list of items
    (``many``) or one item; an item is an id or a dict whose fields name the texts'
    placeholders (``{}`` for an id)."""

    key: str
    undo: Callable[[EngineClient, Any], Awaitable[bool]]  # True: it changed something
    doing: str  # what failed, in an error
    done: str  # what was changed, in the result
    many: bool = False
    last_first: bool = False  # undo a list's items newest first


# The module docstring's table, in its order (after the local exports).
UNDO: tuple[_Undo, ...] = (
    _Undo(
        "attachments",
        lambda c, a: detach_disk(c, a["vm_id"], a["disk_id"]),
        "detach disk {disk_id} from DataMover VM {vm_id}",
        "detached disk {disk_id} from DataMover VM {vm_id}",
        many=True,
        last_first=True,
    ),
    _Undo(
        "standby_transfers",
        end_transfer,
        "end standby upload {}",
        "ended standby upload {} (disk left dirty)",
        many=True,
    ),
    _Undo(
        "transfers",
        end_transfer,
        "finalize image transfer {}",
        "finalized image transfer {}",
        many=True,
    ),
    _Undo(
        "backup",
        lambda c, b: finalize_backup(c, b["vm_id"], b["backup_id"]),
        "finalize backup {backup_id}",
        "finalized backup {backup_id} of VM {vm_id}",
    ),
    _Undo(
        "snapshot",
        lambda c, s: remove_snapshot(c, s["vm_id"], s["snapshot_id"]),
        "remove snapshot {snapshot_id}",
        "removed snapshot {snapshot_id} of VM {vm_id}",
    ),
    _Undo("restore_vm", delete_vm, "delete restored VM {}", "deleted restored VM {}"),
    _Undo(
        "restore_transfers",
        cancel_transfer,
        "cancel upload transfer {}",
        "cancelled upload transfer {}",
        many=True,
    ),
    _Undo(
        "restore_disks",
        delete_disk,
        "delete restored disk {}",
        "deleted restored disk {}",
        many=True,
    ),
)
ENGINE_KEYS = tuple(u.key for u in UNDO)


async def recover(resources: Mapping[str, Any], committed: bool) -> list[str]:
    """Clean up what the journal ``resources`` name (module docstring); ``[]`` when there is
    nothing left to do."""
    steps = Steps()
    exports = resources.get("attach_exports") or []
    if exports:
        try:
            steps.done += await stop_exports(exports)
        except Exception as e:  # noqa: BLE001 - the engine steps below must still run
            steps.errors.append(f"stop the DataMover's qemu-nbd exports: {e}")
    engine = resources.get("engine")
    if engine and any(resources.get(key) for key in ENGINE_KEYS):
        async with EngineClient(EngineConfig.from_record(engine)) as client:
            await _engine_steps(client, resources, steps)
    return steps.result()


def _text(template: str, item: Any) -> str:
    return template.format(**item) if isinstance(item, Mapping) else template.format(item)


async def _engine_steps(client: EngineClient, r: Mapping[str, Any], steps: Steps) -> None:
    for u in UNDO:
        value = r.get(u.key)
        if not value:
            continue
        items = (list(reversed(value)) if u.last_first else list(value)) if u.many else [value]
        for item in items:
            await steps.run(u.undo(client, item), _text(u.doing, item), _text(u.done, item))
