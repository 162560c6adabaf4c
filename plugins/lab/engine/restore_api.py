"""The restore routes (API-NOTES § 8, § 11.1); the work is ``restore``'s.

- ``POST disks`` → 202 with ``status=locked``; ``ok`` ``Faults.disk_seconds`` later, whoever
  polls (``restore.finish_disk``); ``DELETE disks/{id}`` → 200.
- ``POST vms`` (OVF or plain fields) → 201 with the new, down VM; ``DELETE vms/{id}``
  (``?detach_only=true`` keeps its disks) → 200.
- ``POST vms/{id}/diskattachments`` with ``<disk id>`` → 201 with the attachment.

``DELETE`` answers 200 with an empty ``<action/>`` (the SDK raises on 204).
"""

from aiohttp import web
from ovirtsdk4 import types

from plugins.lab.engine import render, restore
from plugins.lab.engine.api import all_content
from plugins.lab.engine.backup_api import _body, act
from plugins.lab.engine.ovf import vm_ovf

API = render.API


async def add_disk(request: web.Request) -> web.Response:
    body = await _body(request, types.Disk)
    assert isinstance(body, types.Disk)
    disk = await restore.create_disk(act(request), body)
    return render.xml_response(render.disk(disk), status=202)


async def delete_disk(request: web.Request) -> web.Response:
    await restore.delete_disk(act(request), request.match_info["id"])
    return render.xml_response(types.Action())


async def add_vm(request: web.Request) -> web.Response:
    a = act(request)
    body = await _body(request, types.Vm)
    assert isinstance(body, types.Vm)
    vm = restore.create_vm(a, body)
    text = vm_ovf(a.inventory, vm) if all_content(request) else None
    return render.xml_response(render.vm(vm, ovf=text), status=201)


async def delete_vm(request: web.Request) -> web.Response:
    detach_only = request.query.get("detach_only", "").lower() == "true"
    await restore.delete_vm(act(request), request.match_info["id"], detach_only=detach_only)
    return render.xml_response(types.Action())


async def add_attachment(request: web.Request) -> web.Response:
    a = act(request)
    body = await _body(request, types.DiskAttachment)
    assert isinstance(body, types.DiskAttachment)
    att = await restore.attach_disk(a, request.match_info["id"], body)
    vm = a.inventory.vms[request.match_info["id"]]
    return render.xml_response(render.attachment(vm, att), status=201)


def routes() -> list[web.RouteDef]:
    """The restore routes; handlers read ``backup_api.ACTIVITY``."""
    return [
        web.post(f"{API}/disks", add_disk),
        web.delete(f"{API}/disks/{{id}}", delete_disk),
        web.post(f"{API}/vms", add_vm),
        web.delete(f"{API}/vms/{{id}}", delete_vm),
        web.post(f"{API}/vms/{{id}}/diskattachments", add_attachment),
    ]
