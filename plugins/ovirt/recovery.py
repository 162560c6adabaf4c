"""What a killed job left on the engine and the DataMover, cleaned up from its journal.

Every flow records what it creates before (ids it chooses itself) or right after (ids the
engine chooses) it exists, under these journal keys; ``recover`` undoes them in this order:

==========================  ======================================  =======================
key                         written by                              recovery
==========================  ======================================  =======================
``attach_exports``          ``attach``, ``attach_restore``          stop the qemu-nbd
                            (each qemu-nbd's private directory)     processes (by directory)
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

from collections.abc import Mapping
from typing import Any

from engine.io.exports import stop_exports
from plugins.ovirt.backups import finalize_backup
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.disks import delete_disk, delete_vm, detach_disk
from plugins.ovirt.idempotent import Steps
from plugins.ovirt.snapshots import remove_snapshot
from plugins.ovirt.transfers import cancel_transfer, end_transfer

ENGINE_KEYS = (
    "attachments",
    "standby_transfers",
    "transfers",
    "backup",
    "snapshot",
    "restore_vm",
    "restore_transfers",
    "restore_disks",
)


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


async def _engine_steps(client: EngineClient, r: Mapping[str, Any], steps: Steps) -> None:
    for a in reversed(r.get("attachments") or []):
        await steps.run(
            detach_disk(client, a["vm_id"], a["disk_id"]),
            f"detach disk {a['disk_id']} from DataMover VM {a['vm_id']}",
            f"detached disk {a['disk_id']} from DataMover VM {a['vm_id']}",
        )
    for transfer_id in r.get("standby_transfers") or []:
        await steps.run(
            end_transfer(client, transfer_id),
            f"end standby upload {transfer_id}",
            f"ended standby upload {transfer_id} (disk left dirty)",
        )
    for transfer_id in r.get("transfers") or []:
        await steps.run(
            end_transfer(client, transfer_id),
            f"finalize image transfer {transfer_id}",
            f"finalized image transfer {transfer_id}",
        )
    if backup := r.get("backup"):
        await steps.run(
            finalize_backup(client, backup["vm_id"], backup["backup_id"]),
            f"finalize backup {backup['backup_id']}",
            f"finalized backup {backup['backup_id']} of VM {backup['vm_id']}",
        )
    if snapshot := r.get("snapshot"):
        await steps.run(
            remove_snapshot(client, snapshot["vm_id"], snapshot["snapshot_id"]),
            f"remove snapshot {snapshot['snapshot_id']}",
            f"removed snapshot {snapshot['snapshot_id']} of VM {snapshot['vm_id']}",
        )
    if restored_vm := r.get("restore_vm"):
        await steps.run(
            delete_vm(client, restored_vm),
            f"delete restored VM {restored_vm}",
            f"deleted restored VM {restored_vm}",
        )
    for transfer_id in r.get("restore_transfers") or []:
        await steps.run(
            cancel_transfer(client, transfer_id),
            f"cancel upload transfer {transfer_id}",
            f"cancelled upload transfer {transfer_id}",
        )
    for disk_id in r.get("restore_disks") or []:
        await steps.run(
            delete_disk(client, disk_id),
            f"delete restored disk {disk_id}",
            f"deleted restored disk {disk_id}",
        )
