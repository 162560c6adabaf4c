"""Disk attachments of the fake engine (API-NOTES § 7 steps 7–10, § 8.4, § 8.5).

- ``POST vms/{id}/diskattachments`` with ``<disk id>``: a plain disk (``restore.attach_disk``
  validates); with ``<disk id><snapshot id/></disk>``: that disk of a VM snapshot, attached
  *transient* (validated as ``AttachDiskToVmCommand``: the snapshot must exist, be ``ok`` and
  hold the disk; the disk must not be attached to this VM yet; ``interface`` and ``bootable``
  are mandatory). → 201, event 2016.
- ``DELETE vms/{id}/diskattachments/{disk}`` (``detach_only`` defaults to true; the lab
  never deletes the disk: ``detach_only=false`` is a 400) → 200, event 2018. The engine
  hot-unplugs first.
- A snapshot with a disk attached somewhere cannot be removed (409, ``snapshots.delete``).

On the lab's DataMover VM (``Devices``, app key ``DEVICES``, when the engine has one) an
active attachment is also *plugged*: it appears as a local device under the DataMover's
by-id directory (``devices``); a plug that fails undoes the attachment (409, event 2017).
"""

from dataclasses import replace

from aiohttp import web
from ovirtsdk4 import types

from plugins.lab.engine import render, restore
from plugins.lab.engine.api import Fault
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.backup_api import _action, _body, act
from plugins.lab.engine.devices import DeviceError, Devices
from plugins.lab.engine.state import Attachment, Vm

API = render.API
DEVICES = web.AppKey("devices", Devices)
DATAMOVER = web.AppKey("datamover", str)  # the name of the VM whose attachments are plugged

DISK_ATTACHED = 2016  # USER_ATTACH_DISK_TO_VM
DISK_ATTACH_FAILED = 2017
DISK_DETACHED = 2018  # USER_DETACH_DISK_FROM_VM


def _enum(value: object) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


async def attach_snapshot_disk(
    a: Activity, vm_id: str, disk_id: str, snapshot_id: str, body: types.DiskAttachment
) -> Attachment:
    """Validate and record a transient attachment of ``disk_id`` as of ``snapshot_id``."""
    async with a._lock:
        vm = a.vm(vm_id)
        disk = a.inventory.disks.get(disk_id)
        if disk is None:
            raise Fault(404, f"Entity not found: disk {disk_id}", "Not Found")
        s = a.snapshots.get(snapshot_id)
        if s is None or s.deleting:
            raise Fault(
                409, f"[Cannot attach Virtual Disk. Snapshot {snapshot_id} does not exist.]"
            )
        if s.status != "ok":
            raise Fault(409, f"[Cannot attach Virtual Disk. Snapshot {snapshot_id} is {s.status}.]")
        if disk_id not in s.volumes:
            raise Fault(
                409,
                f"[Cannot attach Virtual Disk. Disk {disk.alias} is not part of snapshot "
                f"{snapshot_id}.]",
            )
        if any(x.disk_id == disk_id for x in vm.attachments):
            raise Fault(
                409, f"[Cannot attach Virtual Disk. Disk {disk.alias} is attached to VM {vm.name}.]"
            )
        if body.interface is None or body.bootable is None:
            raise Fault(400, "[Cannot attach Virtual Disk. interface and bootable are required.]")
        att = Attachment(
            disk_id=disk_id,
            interface=_enum(body.interface) or "virtio_scsi",
            bootable=bool(body.bootable),
            active=bool(body.active),
            read_only=bool(body.read_only),
            snapshot_id=snapshot_id,
        )
        a.inventory.vms[vm.id] = replace(vm, attachments=(*vm.attachments, att))
        a.event(
            DISK_ATTACHED,
            f"Disk {disk.alias} (snapshot {snapshot_id}) was attached to VM {vm.name}.",
            vm.id,
        )
        return att


def _find(vm: Vm, disk_id: str) -> Attachment:
    for x in vm.attachments:
        if x.disk_id == disk_id:
            return x
    raise Fault(404, f"Entity not found: disk attachment {disk_id} of VM {vm.id}", "Not Found")


def _drop(a: Activity, vm_id: str, disk_id: str) -> None:
    vm = a.inventory.vms[vm_id]
    a.inventory.vms[vm_id] = replace(
        vm, attachments=tuple(x for x in vm.attachments if x.disk_id != disk_id)
    )


async def plug(a: Activity, devices: Devices, vm_id: str, att: Attachment) -> None:
    """Make the local device of a new attachment; on failure undo the attachment (409)."""
    async with a._lock:
        disk = a.inventory.disks[att.disk_id]
        vm = a.inventory.vms[vm_id]
        if att.snapshot_id is not None:
            volume = a.snapshots[att.snapshot_id].volumes[att.disk_id]
            image, fmt = volume.path, volume.fmt
        else:
            image, fmt = a.image(disk), a.active_format(disk)
        try:
            await devices.plug(
                disk.id,
                att.interface,
                image,
                fmt,
                transient=att.snapshot_id is not None,
                volume_size=a.volume_sizes.get(image),  # a block volume: no extension
                iops=a.faults.storage_iops,  # slow storage is slow for the DataMover too
            )
        except DeviceError as e:
            _drop(a, vm_id, att.disk_id)
            a.event(
                DISK_ATTACH_FAILED,
                f"Failed to attach Disk {disk.alias} to VM {vm.name}: {e}",
                vm.id,
                "error",
            )
            raise Fault(409, f"[Cannot attach Virtual Disk. Hot plug failed: {e}]") from e


async def add_attachment(request: web.Request) -> web.Response:
    a = act(request)
    vm_id = request.match_info["id"]
    body = await _body(request, types.DiskAttachment)
    assert isinstance(body, types.DiskAttachment)
    snapshot = body.disk.snapshot if body.disk is not None else None
    if snapshot is not None:
        if not (body.disk and body.disk.id and snapshot.id):
            raise Fault(400, "[Cannot attach Virtual Disk. disk.id and snapshot.id needed.]")
        att = await attach_snapshot_disk(a, vm_id, body.disk.id, snapshot.id, body)
    else:
        att = await restore.attach_disk(a, vm_id, body)
    vm = a.inventory.vms[vm_id]
    devices = request.app.get(DEVICES)
    if devices is not None and att.active and vm.name == request.app.get(DATAMOVER):
        await plug(a, devices, vm_id, att)
    return render.xml_response(render.attachment(vm, att), status=201)


async def delete_attachment(request: web.Request) -> web.Response:
    a = act(request)
    detach_only = request.query.get("detach_only", "true").lower() != "false"
    if not detach_only:
        raise Fault(400, "[Cannot detach Virtual Disk. The lab only detaches (detach_only).]")
    async with a._lock:
        vm = a.vm(request.match_info["id"])
        att = _find(vm, request.match_info["disk_id"])
        devices = request.app.get(DEVICES)
        if devices is not None:
            await devices.unplug(att.disk_id)  # the engine hot-unplugs first
        _drop(a, vm.id, att.disk_id)
        disk = a.inventory.disks.get(att.disk_id)
        a.event(
            DISK_DETACHED,
            f"Disk {disk.alias if disk else att.disk_id} was detached from VM {vm.name}.",
            vm.id,
        )
    return _action()


def routes() -> list[web.RouteDef]:
    """The attachment routes (they replace ``restore_api``'s POST); read ``ACTIVITY``."""
    base = f"{API}/vms/{{id}}/diskattachments"
    return [
        web.post(base, add_attachment),
        web.delete(f"{base}/{{disk_id}}", delete_attachment),
    ]
