"""Disks and VMs the plugin attaches, detaches and deletes: a restore's new disks and VM, a
snapshot's disks on the DataMover, a standby's old copies, and what ``recovery`` cleans up.

Every removal is idempotent (``idempotent.already_done``): one whose object is already gone
returns False, so a recovery run twice changes nothing the second time. Deleting a VM always
keeps its disks (``detach_only``): the plugin deletes disks one by one, only those it made.
"""

from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t

from engine.util import failpoints
from plugins.ovirt.client import EngineClient
from plugins.ovirt.idempotent import Wanted, already_done
from plugins.ovirt.polling import Wait

LOCKED_TIMEOUT: Final = 600.0  # a preallocated disk on block storage takes minutes to create


def _attachments(conn: sdk.Connection, vm_id: str) -> Any:
    return conn.system_service().vms_service().vm_service(vm_id).disk_attachments_service()


async def attach_disk(
    client: EngineClient,
    vm_id: str,
    vm_name: str,
    disk_id: str,
    *,
    interface: str = "virtio_scsi",
    bootable: bool = False,
    snapshot_id: str | None = None,
) -> None:
    """Attach ``disk_id`` to the VM, active (plugged when the VM runs). With ``snapshot_id``
    the disk as of that snapshot is attached (a transient overlay: the DataMover reads a
    snapshot this way). Never retried: a repeated POST is refused as a second attachment."""
    disk = t.Disk(id=disk_id, snapshot=t.Snapshot(id=snapshot_id) if snapshot_id else None)
    body = t.DiskAttachment(
        disk=disk,
        interface=t.DiskInterface(interface),
        bootable=bootable,
        active=True,
        pass_discard=False,
    )

    def add(conn: sdk.Connection) -> Any:
        return _attachments(conn, vm_id).add(body)

    await client.call(add, "attach disk", obj=f"disk {disk_id} to VM {vm_name}", idempotent=False)


async def detach_disk(
    client: EngineClient, vm_id: str, disk_id: str, *, failpoint: str | None = None
) -> bool:
    """Detach (never delete) ``disk_id`` from the VM; False if it was not attached (404,
    ``idempotent.already_done``). ``failpoint`` (crash tests) is hit after a detach."""

    def remove(conn: sdk.Connection) -> bool:
        try:
            _attachments(conn, vm_id).attachment_service(disk_id).remove(detach_only=True)
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    detached = await client.call(remove, "detach disk", obj=f"disk {disk_id} from VM {vm_id}")
    if failpoint is not None and detached:
        failpoints.hit(failpoint)
    return detached


async def delete_disk(client: EngineClient, disk_id: str) -> bool:
    """Delete a disk; False when it was already gone (``idempotent.already_done``). A disk
    still ``locked`` (being created, or its transfer ending) is waited for first: the engine
    refuses to delete it (409 ``Disk … is locked``), and a failed restore cleans up a disk
    it has just created."""

    def status(conn: sdk.Connection) -> str | None:
        try:
            disk = conn.system_service().disks_service().disk_service(disk_id).get()
        except sdk.NotFoundError:
            return None
        return str(disk.status.value) if disk.status is not None else "?"

    wait = Wait(client.clock, LOCKED_TIMEOUT)
    while (await client.call(status, "poll disk", obj=f"disk {disk_id}")) == "locked":
        if wait.expired:
            break  # the DELETE below says what the engine thinks
        await wait.pause()

    def remove(conn: sdk.Connection) -> bool:
        try:
            conn.system_service().disks_service().disk_service(disk_id).remove()
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    return await client.call(remove, "delete disk", obj=f"disk {disk_id}")


async def delete_vm(client: EngineClient, vm_id: str) -> bool:
    """Delete a VM but keep its disks (``detach_only``); False when it was already gone."""

    def remove(conn: sdk.Connection) -> bool:
        try:
            conn.system_service().vms_service().vm_service(vm_id).remove(detach_only=True)
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    return await client.call(remove, "delete VM", obj=f"VM {vm_id}")
