"""VM snapshots Tessera takes for a backup (the snapshot and the LAN-free flows) and removes
afterwards; used by ``snapshot``, ``attach`` and ``recovery``.

::

    create_snapshot   POST vms/{vm}/snapshots (our own id, recorded in the journal first;
                      description "Tessera <checkpoint>", persist_memorystate=false, only
                      the disks the flow reads)
    wait_snapshot     ──poll──▶ ok   (gone: creation failed)
    snapshot_volumes  GET snapshots/{s}/disks → disk id → the snapshot's volume id
    remove_snapshot   (locked: wait) DELETE ──poll──▶ gone (a merge; idempotent)
"""

import uuid
from collections.abc import Sequence
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t

from engine.core.errors import EngineError
from engine.sources.types import ResourceRecorder
from engine.util import failpoints
from plugins.ovirt.client import EngineClient
from plugins.ovirt.idempotent import Wanted, already_done
from plugins.ovirt.inventory import DiskRef, VmRef
from plugins.ovirt.polling import Wait

READY_TIMEOUT: Final = 600.0  # a snapshot of a VM with many disks takes minutes
REMOVE_TIMEOUT: Final = 1800.0  # removing a snapshot of a running VM is a live merge
FULL_READ: Final = "snapshot flow reads fully"  # the fallback reason of an asked incremental


class OvirtSnapshotError(EngineError):
    template = "VM {vm}: snapshot {snapshot}: {reason}"


def _service(conn: sdk.Connection, vm_id: str, snapshot_id: str) -> Any:
    vms = conn.system_service().vms_service()
    return vms.vm_service(vm_id).snapshots_service().snapshot_service(snapshot_id)


def _status(conn: sdk.Connection, vm_id: str, snapshot_id: str) -> str | None:
    try:
        s = _service(conn, vm_id, snapshot_id).get()
    except sdk.NotFoundError:
        return None
    return str(s.snapshot_status.value) if s.snapshot_status else "?"


async def create_snapshot(
    client: EngineClient,
    vm: VmRef,
    disks: Sequence[DiskRef],
    checkpoint: str,
    record: ResourceRecorder,
) -> str:
    """Create the snapshot of ``disks`` (without memory) and return its id; it is recorded
    (``snapshot``: vm and snapshot id) before the POST, so a process killed while the engine
    creates it leaves it to ``recovery``. Not waited for: ``wait_snapshot``."""
    snapshot_id = str(uuid.uuid4())
    await record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})  # before it exists
    body = t.Snapshot(
        id=snapshot_id,
        description=f"Tessera {checkpoint}",
        persist_memorystate=False,
        disk_attachments=[t.DiskAttachment(disk=t.Disk(id=d.id)) for d in disks],
    )

    def create(conn: sdk.Connection) -> Any:
        vms = conn.system_service().vms_service()
        return vms.vm_service(vm.id).snapshots_service().add(body)

    created = await client.call(create, "create snapshot", obj=f"VM {vm.name}", idempotent=False)
    if created.id != snapshot_id:  # an engine that picks its own id
        snapshot_id = str(created.id)
        await record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})
    return snapshot_id


async def wait_snapshot(client: EngineClient, vm_id: str, snapshot_id: str) -> None:
    """Poll until the snapshot is ``ok``; a snapshot that vanished failed to be created."""
    wait = Wait(client.clock, READY_TIMEOUT)

    def status(conn: sdk.Connection) -> str | None:
        return _status(conn, vm_id, snapshot_id)

    while (current := await client.call(status, "poll snapshot", obj=snapshot_id)) != "ok":
        if current is None:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="creation failed")
        if wait.expired:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason=f"still {current}")
        await wait.pause()


async def snapshot_volumes(client: EngineClient, vm_id: str, snapshot_id: str) -> dict[str, str]:
    """Disk id → the snapshot's volume id of that disk (``<snapshot id>`` of a transfer)."""

    def get(conn: sdk.Connection) -> dict[str, str]:
        disks = _service(conn, vm_id, snapshot_id).disks_service().list()
        return {d.id: d.image_id for d in disks if d.image_id}

    return await client.call(get, "list snapshot disks", obj=f"snapshot {snapshot_id}")


async def remove_snapshot(
    client: EngineClient, vm_id: str, snapshot_id: str, *, failpoint: str | None = None
) -> bool:
    """DELETE the snapshot (a merge) and poll until it is gone (404).

    A ``locked`` snapshot (still being created, or already being removed: the engine refuses
    a DELETE of either with 409) is waited for first; then one that is gone needs nothing.
    Returns False when it was gone without this call's DELETE (``idempotent.already_done``).
    ``failpoint`` (crash tests) is hit after the DELETE was sent (``.sent``) and once the
    snapshot is gone (``.done``)."""

    def status(conn: sdk.Connection) -> str | None:
        return _status(conn, vm_id, snapshot_id)

    def remove(conn: sdk.Connection) -> bool:
        try:
            _service(conn, vm_id, snapshot_id).remove()
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    what = f"snapshot {snapshot_id}"
    wait = Wait(client.clock, REMOVE_TIMEOUT)
    while (current := await client.call(status, "poll snapshot", obj=what)) == "locked":
        if wait.expired:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="still locked")
        await wait.pause()
    if current is None:
        return False
    acted = await client.call(remove, "remove snapshot", obj=what)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    while await client.call(status, "poll snapshot removal", obj=what) is not None:
        if wait.expired:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="never removed")
        await wait.pause()
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted
