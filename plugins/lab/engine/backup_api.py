"""The backup API routes: backups, checkpoints, image transfers, events (API-NOTES § 4, 5, 9).

Handlers parse request bodies with the SDK's reader and answer with its writers, like
``api``; the work and the state are ``backup.Activity``'s (app key ``ACTIVITY``). What a
client sees:

- Phases move with time (``monitor``, one step per ``Faults.phase_seconds`` of the engine's
  clock), not per GET: a ``GET`` only reads them.
- ``POST vms/{id}/backups[?legacy=true]`` → 202 with ``phase=initializing``, then
  initializing → starting → ready; finalizing → succeeded.
  On a hybrid cluster (``hybrid``) the backup carries ``<snapshot id>`` and stays
  ``finalizing`` one more step while its snapshot is removed.
  ``to_checkpoint_id`` is shown from ready on; ``disks`` is a link to ``…/backups/{b}/disks``,
  whose disks carry ``backup_mode``.
- ``POST imagetransfers`` → 202 ``initializing`` with ``<host>`` (always); then
  ``transferring`` with the URLs (``transfer_url`` = ``proxy_url`` = the lab imageio daemon's
  data URL). With ``<snapshot id=…>`` (a disk snapshot id, see ``snapshot_api``) it
  downloads that volume. An idle transfer is stopped by the inactivity monitor
  (``transfers.time_out``).
- ``POST imagetransfers/{t}/extend`` renews the transfer's imageio ticket (``transfers``); it
  does not reset the ticket's idle time.
- Actions (``finalize``, ``cancel``, ``extend``) answer ``<action><status>complete``;
  ``DELETE`` answers 200 with an empty ``<action/>`` (the SDK raises on 204). A checkpoint of
  a down VM is deleted "later": it shows ``state=invalid`` until ``monitor`` finishes the
  delete, then 404.
- ``GET events`` lists newest first; ``search=`` is free text over the description (a backup
  id finds its events) or ``type=<code>`` / ``severity=``; ``from=<index>`` and ``max=``.
"""

from functools import partial

from aiohttp import web
from ovirtsdk4 import types
from ovirtsdk4.reader import Reader

from plugins.lab.engine import hybrid, render, search
from plugins.lab.engine import transfers as transfer_ops
from plugins.lab.engine.api import Fault
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.records import Backup, Checkpoint, Event, Transfer

ACTIVITY = web.AppKey("activity", Activity)
API = render.API


def _ref(cls: type, collection: str, obj_id: str) -> object:
    ref = cls(id=obj_id)
    ref.href = f"{API}/{collection}/{obj_id}"
    return ref


def render_backup(b: Backup, snapshot_id: str | None = None) -> types.Backup:
    shown = b.phase in ("ready", "finalizing", "succeeded")
    out = types.Backup(
        id=b.id,
        phase=types.BackupPhase(b.phase),
        description=b.description,
        from_checkpoint_id=b.from_checkpoint_id,
        to_checkpoint_id=b.to_checkpoint_id if shown else None,
        creation_date=b.created,
        modification_date=b.modified,
        vm=_ref(types.Vm, "vms", b.vm_id),
        host=_ref(types.Host, "hosts", b.host_id) if b.host_id else None,
        disks=render.link(f"vms/{b.vm_id}/backups/{b.id}/disks"),
        snapshot=_ref(types.Snapshot, f"vms/{b.vm_id}/snapshots", snapshot_id)
        if snapshot_id
        else None,
    )
    out.href = f"{API}/vms/{b.vm_id}/backups/{b.id}"
    return out


def render_checkpoint(c: Checkpoint, invalid: bool = False) -> types.Checkpoint:
    out = types.Checkpoint(
        id=c.id,
        parent_id=c.parent_id,
        creation_date=c.created,
        state=types.CheckpointState.INVALID if invalid else types.CheckpointState.CREATED,
        description=c.description,
        vm=_ref(types.Vm, "vms", c.vm_id),
        disks=render.link(f"vms/{c.vm_id}/checkpoints/{c.id}/disks"),
    )
    out.href = f"{API}/vms/{c.vm_id}/checkpoints/{c.id}"
    return out


def render_transfer(t: Transfer) -> types.ImageTransfer:
    serving = t.phase == "transferring"
    out = types.ImageTransfer(
        id=t.id,
        phase=types.ImageTransferPhase(t.phase),
        direction=types.ImageTransferDirection(t.direction),
        format=types.DiskFormat.RAW,
        image=types.Image(id=t.disk_id),
        disk=_ref(types.Disk, "disks", t.disk_id),
        backup=types.Backup(id=t.backup_id) if t.backup_id else None,
        host=_ref(types.Host, "hosts", t.host_id) if t.host_id else None,
        transfer_url=t.url if serving else None,
        proxy_url=t.url if serving else None,
        inactivity_timeout=t.inactivity_timeout,
        timeout_policy=types.ImageTransferTimeoutPolicy(t.timeout_policy),
        transferred=0,
        active=serving,
        shallow=False,
    )
    out.href = f"{API}/imagetransfers/{t.id}"
    return out


def render_event(e: Event) -> types.Event:
    out = types.Event(
        id=str(e.index),
        index=e.index,
        code=e.code,
        severity=types.LogSeverity(e.severity),
        description=e.description,
        time=e.time,
        origin=e.origin,
        custom_id=e.custom_id,
        vm=_ref(types.Vm, "vms", e.vm_id) if e.vm_id else None,
    )
    out.href = f"{API}/events/{e.index}"
    return out


async def _body(request: web.Request, cls: type) -> object:
    text = await request.read()
    try:
        obj = Reader.read(text) if text.strip() else None
    except Exception as e:  # noqa: BLE001 - the SDK's reader raises plain errors
        raise Fault(400, f"cannot parse the request body: {e}") from None
    if not isinstance(obj, cls):
        raise Fault(400, f"the request body must be a <{cls.__name__.lower()}>")
    return obj


def _action() -> web.Response:
    return render.xml_response(types.Action(status="complete"))


def act(request: web.Request) -> Activity:
    return request.app[ACTIVITY]


async def backups(request: web.Request) -> web.Response:
    a = act(request)
    vm = a.vm(request.match_info["id"])
    items = [render_backup(b, a.hybrid.get(b.id)) for b in a.backups.values() if b.vm_id == vm.id]
    return render.xml_response(items, root="backups")


async def add_backup(request: web.Request) -> web.Response:
    a = act(request)
    body = await _body(request, types.Backup)
    assert isinstance(body, types.Backup)
    disk_ids = [d.id for d in body.disks or [] if d.id]
    vm = a.vm(request.match_info["id"])
    legacy = request.query.get("legacy", "").lower() == "true"
    snapshot = partial(hybrid.take_snapshot, a) if hybrid.applies(a, vm, legacy) else None
    b = await a.start_backup(
        vm.id, disk_ids, body.from_checkpoint_id, body.id, body.description, snapshot
    )
    return render.xml_response(render_backup(b, a.hybrid.get(b.id)), status=202)


async def backup(request: web.Request) -> web.Response:
    a = act(request)
    b = a.backup(request.match_info["id"], request.match_info["backup_id"])
    return render.xml_response(render_backup(b, a.hybrid.get(b.id)))


async def backup_disks(request: web.Request) -> web.Response:
    a = act(request)
    b = a.backup(request.match_info["id"], request.match_info["backup_id"])
    out = []
    for disk_id in b.disk_ids:
        d = render.disk(a.inventory.disks[disk_id])
        d.backup_mode = types.DiskBackupMode(b.modes[disk_id])
        out.append(d)
    return render.xml_response(out, root="disks")


async def finalize_backup(request: web.Request) -> web.Response:
    a = act(request)
    b = a.backup(request.match_info["id"], request.match_info["backup_id"])
    a.finalize_backup(b)
    await hybrid.remove_snapshot(a, b)
    return _action()


async def checkpoints(request: web.Request) -> web.Response:
    a = act(request)
    vm = a.vm(request.match_info["id"])
    items = [render_checkpoint(c, c.id in a.deleting_checkpoints) for c in a.vm_checkpoints(vm.id)]
    return render.xml_response(items, root="checkpoints")


async def checkpoint(request: web.Request) -> web.Response:
    a = act(request)
    c = a.checkpoint(request.match_info["id"], request.match_info["checkpoint_id"])
    return render.xml_response(render_checkpoint(c, c.id in a.deleting_checkpoints))


async def checkpoint_disks(request: web.Request) -> web.Response:
    a = act(request)
    c = a.checkpoint(request.match_info["id"], request.match_info["checkpoint_id"])
    disks = [render.disk(a.inventory.disks[d]) for d in c.disk_ids]
    return render.xml_response(disks, root="disks")


async def delete_checkpoint(request: web.Request) -> web.Response:
    a = act(request)
    c = a.checkpoint(request.match_info["id"], request.match_info["checkpoint_id"])
    await a.delete_checkpoint(c)
    return render.xml_response(types.Action())


async def transfers(request: web.Request) -> web.Response:
    items = [render_transfer(t) for t in act(request).transfers.values()]
    return render.xml_response(items, root="image_transfers")


async def add_transfer(request: web.Request) -> web.Response:
    body = await _body(request, types.ImageTransfer)
    assert isinstance(body, types.ImageTransfer)
    disk_id = body.disk.id if body.disk else (body.image.id if body.image else None)
    direction = body.direction.value if body.direction else "upload"
    t = await transfer_ops.start(
        act(request),
        disk_id,
        body.backup.id if body.backup else None,
        direction,
        body.format.value if body.format else "raw",
        body.inactivity_timeout,
        body.timeout_policy.value if body.timeout_policy else None,
        body.snapshot.id if body.snapshot else None,
    )
    return render.xml_response(render_transfer(t), status=202)


async def transfer(request: web.Request) -> web.Response:
    a = act(request)
    return render.xml_response(render_transfer(a.transfer(request.match_info["id"])))


async def finalize_transfer(request: web.Request) -> web.Response:
    a = act(request)
    await transfer_ops.end(a, a.transfer(request.match_info["id"]), cancel=False)
    return _action()


async def cancel_transfer(request: web.Request) -> web.Response:
    a = act(request)
    await transfer_ops.end(a, a.transfer(request.match_info["id"]), cancel=True)
    return _action()


async def extend_transfer(request: web.Request) -> web.Response:
    a = act(request)
    await transfer_ops.extend(a, a.transfer(request.match_info["id"]))
    return _action()


async def events(request: web.Request) -> web.Response:
    q = request.query
    items = list(reversed(act(request).events))  # newest first
    if "from" in q:
        items = [e for e in items if e.index > _int(q["from"], "from")]
    text = q.get("search")
    if text and "=" in text:
        try:
            query = search.parse(text, ("type", "severity", "message"), case_sensitive=False)
        except search.SearchError as e:
            raise Fault(400, str(e)) from None
        items = [
            e
            for e in items
            if query.matches(
                {"type": str(e.code), "severity": e.severity, "message": e.description}
            )
        ]
    elif text:
        items = [e for e in items if text.lower() in e.description.lower()]
    if "max" in q:
        items = items[: max(0, _int(q["max"], "max"))]
    return render.xml_response([render_event(e) for e in items], root="events")


def routes() -> list[web.RouteDef]:
    """The backup routes; handlers read the ``ACTIVITY`` app key."""
    vm = f"{API}/vms/{{id}}"
    return [
        web.get(f"{vm}/backups", backups),
        web.post(f"{vm}/backups", add_backup),
        web.get(f"{vm}/backups/{{backup_id}}", backup),
        web.get(f"{vm}/backups/{{backup_id}}/disks", backup_disks),
        web.post(f"{vm}/backups/{{backup_id}}/finalize", finalize_backup),
        web.get(f"{vm}/checkpoints", checkpoints),
        web.get(f"{vm}/checkpoints/{{checkpoint_id}}", checkpoint),
        web.delete(f"{vm}/checkpoints/{{checkpoint_id}}", delete_checkpoint),
        web.get(f"{vm}/checkpoints/{{checkpoint_id}}/disks", checkpoint_disks),
        web.get(f"{API}/imagetransfers", transfers),
        web.post(f"{API}/imagetransfers", add_transfer),
        web.get(f"{API}/imagetransfers/{{id}}", transfer),
        web.post(f"{API}/imagetransfers/{{id}}/finalize", finalize_transfer),
        web.post(f"{API}/imagetransfers/{{id}}/cancel", cancel_transfer),
        web.post(f"{API}/imagetransfers/{{id}}/extend", extend_transfer),
        web.get(f"{API}/events", events),
    ]


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise Fault(400, f"{name}={value!r} is not a number") from None
