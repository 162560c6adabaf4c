"""The snapshot routes (API-NOTES § 7): ``vms/{id}/snapshots[/{s}[/disks]]``.

- ``POST vms/{id}/snapshots`` with ``<snapshot><description>…`` (mandatory; ``id`` is honoured
  when given, ``disk_attachments`` limits the disks) → 202 ``snapshot_status=locked``, ``ok``
  ``Faults.phase_seconds`` later whoever polls (``monitor``). The work (overlays, bitmaps) is
  ``snapshots``'s.
- ``GET`` of one snapshot or the list, with ``all_content=true``, carries the OVF the VM had
  at creation in ``initialization.configuration`` (the SDK's ``SnapshotService.get`` needs
  ``query={'all_content': 'true'}``, § 7 step 5).
- ``GET …/snapshots/{s}/disks``: the snapshot's disks; ``image_id`` is the snapshot volume id,
  which is what ``<snapshot id>`` of an image transfer names; ``format`` that volume's.
- ``DELETE …/snapshots/{s}`` → 200; the merge is done at once; the snapshot shows ``locked``
  for ``Faults.phase_seconds``, then 404.
"""

from aiohttp import web
from ovirtsdk4 import types

from plugins.lab.engine import render, snapshots
from plugins.lab.engine.api import Fault, all_content
from plugins.lab.engine.backup_api import _action, _body, _ref, act
from plugins.lab.engine.ovf import vm_ovf
from plugins.lab.engine.records import Snapshot
from plugins.lab.engine.state import Vm

API = render.API


def render_snapshot(s: Snapshot, content: bool) -> types.Snapshot:
    out = types.Snapshot(
        id=s.id,
        description=s.description,
        snapshot_status=types.SnapshotStatus(s.status),
        snapshot_type=types.SnapshotType.REGULAR,
        date=s.created,
        persist_memorystate=s.persist_memorystate,
        vm=_ref(types.Vm, "vms", s.vm_id),
        disks=render.link(f"vms/{s.vm_id}/snapshots/{s.id}/disks"),
        initialization=render.configuration(s.ovf) if content else None,
    )
    out.href = f"{API}/vms/{s.vm_id}/snapshots/{s.id}"
    return out


def render_active(request: web.Request, vm: Vm) -> types.Snapshot:
    """The ``Active VM`` snapshot every VM has: its current state."""
    s_id = snapshots.active_snapshot_id(vm)
    out = types.Snapshot(
        id=s_id,
        description="Active VM",
        snapshot_status=types.SnapshotStatus.OK,
        snapshot_type=types.SnapshotType.ACTIVE,
        persist_memorystate=False,
        vm=_ref(types.Vm, "vms", vm.id),
        initialization=(
            render.configuration(vm_ovf(act(request).inventory, vm))
            if all_content(request)
            else None
        ),
    )
    out.href = f"{API}/vms/{vm.id}/snapshots/{s_id}"
    return out


async def list_snapshots(request: web.Request) -> web.Response:
    a = act(request)
    vm = a.vm(request.match_info["id"])
    content = all_content(request)
    items = [render_active(request, vm)]
    items += [render_snapshot(s, content) for s in snapshots.vm_snapshots(a, vm.id)]
    return render.xml_response(items, root="snapshots")


async def add_snapshot(request: web.Request) -> web.Response:
    a = act(request)
    body = await _body(request, types.Snapshot)
    assert isinstance(body, types.Snapshot)
    disk_ids = None
    if body.disk_attachments:
        disk_ids = [x.disk.id if x.disk else x.id for x in body.disk_attachments]
    s = await snapshots.create(
        a,
        request.match_info["id"],
        body.description,
        body.id,
        [d for d in disk_ids if d] if disk_ids is not None else None,
        bool(body.persist_memorystate),
    )
    return render.xml_response(render_snapshot(s, False), status=202)


def _snapshot_or_active(request: web.Request) -> Snapshot | Vm:
    a = act(request)
    vm = a.vm(request.match_info["id"])
    s_id = request.match_info["snapshot_id"]
    if s_id == snapshots.active_snapshot_id(vm):
        return vm
    return snapshots.snapshot(a, vm.id, s_id)


async def get_snapshot(request: web.Request) -> web.Response:
    s = _snapshot_or_active(request)
    if isinstance(s, Vm):
        return render.xml_response(render_active(request, s))
    return render.xml_response(render_snapshot(s, all_content(request)))


async def snapshot_disks(request: web.Request) -> web.Response:
    a = act(request)
    s = _snapshot_or_active(request)
    if isinstance(s, Vm):  # the active layer: the images snapshots are made of
        disks = [a.inventory.disks[x.disk_id] for x in s.attachments]
        return render.xml_response([render.disk(d) for d in disks if d.snapable], root="disks")
    out = []
    for disk_id, volume in s.volumes.items():
        d = render.disk(a.inventory.disks[disk_id])
        d.image_id = volume.id
        d.format = types.DiskFormat.COW if volume.fmt == "qcow2" else types.DiskFormat.RAW
        d.snapshot = types.Snapshot(id=s.id)
        out.append(d)
    return render.xml_response(out, root="disks")


async def delete_snapshot(request: web.Request) -> web.Response:
    s = _snapshot_or_active(request)
    if isinstance(s, Vm):
        raise Fault(409, "[Cannot remove Snapshot. The active snapshot cannot be removed.]")
    await snapshots.delete(act(request), s)
    return _action()


def routes() -> list[web.RouteDef]:
    """The snapshot routes; handlers read ``backup_api.ACTIVITY``."""
    base = f"{API}/vms/{{id}}/snapshots"
    return [
        web.get(base, list_snapshots),
        web.post(base, add_snapshot),
        web.get(f"{base}/{{snapshot_id}}", get_snapshot),
        web.delete(f"{base}/{{snapshot_id}}", delete_snapshot),
        web.get(f"{base}/{{snapshot_id}}/disks", snapshot_disks),
    ]
