"""The read-only routes real clients walk beside the backup ones (API-NOTES § 3, § 9.2).

The SDK's own examples (``tests/conformance``) follow these; each answers as the engine does,
``<fault>`` 404 for an unknown id included:

- ``GET templates[/{id}]``: the engine's ``Blank`` template (every lab VM's ``template``);
- ``GET networks[/{id}]``: ``ovirtmgmt`` of the data center (every NIC's network);
- ``GET vms/{id}/nics[/{nic}]``: the VM's NICs (``virtio``, plugged, a stable MAC in the
  engine's default ``56:6f`` pool) with a ``vnic_profile`` of ``ovirtmgmt``;
- ``GET vms/{id}/reporteddevices``: what the guest agent reports (a network device per NIC
  with its MAC and an address); empty without an agent or while the VM is down;
- ``GET vms/{id}/permissions``: the lab user as ``SuperUser`` (the engine lists at least the
  inherited system permission);
- ``GET disks/{id}/disksnapshots[?include_active=true]`` and ``GET storagedomains/{id}/
  disksnapshots[/{ds}]``: disk snapshots, ``id`` = the volume id a transfer's ``<snapshot
  id>`` names, ``parent`` the volume below it. A VM snapshot gives each of its disks one
  volume (``snapshots``); the active volume (the disk's ``image_id``) is listed only with
  ``include_active=true``, as the engine does since 4.5;
- ``POST events``: an external event. ``origin``, ``severity``, ``custom_id`` and
  ``description`` are mandatory (400 ``Incomplete parameters``, ``BackendEventsResource.add``);
  ``origin`` ``oVirt`` is reserved and a repeated (``origin``, ``custom_id``) is refused
  (400); the reply is 201 with the event, which ``GET events`` then lists newest first.
"""

from aiohttp import web
from ovirtsdk4 import types

from plugins.lab.engine import render
from plugins.lab.engine.api import INVENTORY, Fault
from plugins.lab.engine.backup_api import _body, act, render_event
from plugins.lab.engine.records import Event, Volume
from plugins.lab.engine.state import BLANK_TEMPLATE_ID, Disk, Inventory, Vm, lab_id

API = render.API
MGMT_NETWORK = "ovirtmgmt"
EXTERNAL_EVENT = {"normal": 12, "warning": 13, "error": 14, "alert": 14}  # AuditLogType codes
EVENT_FIELDS = ("origin", "severity", "custom_id", "description")


def _not_found(kind: str, obj_id: str) -> Fault:
    return Fault(404, f"Entity not found: {kind} {obj_id}", "Not Found")


def _ref(cls: type, collection: str, obj_id: str) -> object:
    ref = cls(id=obj_id)
    ref.href = f"{API}/{collection}/{obj_id}"
    return ref


def _vm(request: web.Request) -> Vm:
    vm_id = request.match_info["id"]
    vm = request.app[INVENTORY].vms.get(vm_id)
    if vm is None:
        raise _not_found("VM", vm_id)
    return vm


# --- templates and networks -----------------------------------------------------------------


def _template(inv: Inventory) -> types.Template:
    out = types.Template(
        id=BLANK_TEMPLATE_ID,
        name="Blank",
        description="Blank template",
        status=types.TemplateStatus.OK,
        type=types.VmType.SERVER,
        memory=1024**3,
        os=types.OperatingSystem(type="other"),
        version=types.TemplateVersion(version_number=1),
    )
    out.href = f"{API}/templates/{BLANK_TEMPLATE_ID}"
    return out


def _network_id(inv: Inventory) -> str:
    dc = next(iter(inv.data_centers.values()))
    return lab_id("network", f"{dc.name}/{MGMT_NETWORK}")


def _network(inv: Inventory) -> types.Network:
    dc = next(iter(inv.data_centers.values()))
    out = types.Network(
        id=_network_id(inv),
        name=MGMT_NETWORK,
        description="Management Network",
        mtu=0,
        stp=False,
        usages=[types.NetworkUsage.VM, types.NetworkUsage.MANAGEMENT],
        data_center=_ref(types.DataCenter, "datacenters", dc.id),
    )
    out.href = f"{API}/networks/{out.id}"
    return out


async def templates(request: web.Request) -> web.Response:
    return render.xml_response([_template(request.app[INVENTORY])], root="templates")


async def template(request: web.Request) -> web.Response:
    if request.match_info["id"] != BLANK_TEMPLATE_ID:
        raise _not_found("template", request.match_info["id"])
    return render.xml_response(_template(request.app[INVENTORY]))


async def networks(request: web.Request) -> web.Response:
    return render.xml_response([_network(request.app[INVENTORY])], root="networks")


async def network(request: web.Request) -> web.Response:
    inv = request.app[INVENTORY]
    if request.match_info["id"] != _network_id(inv):
        raise _not_found("network", request.match_info["id"])
    return render.xml_response(_network(inv))


# --- VM NICs, reported devices, permissions -------------------------------------------------


def _mac(vm: Vm, nic: str) -> str:
    digest = lab_id("nic", f"{vm.name}/{nic}").replace("-", "")
    return "56:6f:" + ":".join(digest[i : i + 2] for i in range(0, 8, 2))


def _nic(inv: Inventory, vm: Vm, nic: str) -> types.Nic:
    nic_id = lab_id("nic", f"{vm.name}/{nic}")  # the OVF's InstanceId of this NIC
    profile = lab_id("vnicprofile", MGMT_NETWORK)
    out = types.Nic(
        id=nic_id,
        name=nic,
        interface=types.NicInterface.VIRTIO,
        mac=types.Mac(address=_mac(vm, nic)),
        plugged=True,
        linked=True,
        vnic_profile=_ref(types.VnicProfile, "vnicprofiles", profile),
        vm=_ref(types.Vm, "vms", vm.id),
    )
    out.href = f"{API}/vms/{vm.id}/nics/{nic_id}"
    return out


async def nics(request: web.Request) -> web.Response:
    inv, vm = request.app[INVENTORY], _vm(request)
    return render.xml_response([_nic(inv, vm, n) for n in vm.nics], root="nics")


async def nic(request: web.Request) -> web.Response:
    inv, vm = request.app[INVENTORY], _vm(request)
    for n in vm.nics:
        out = _nic(inv, vm, n)
        if out.id == request.match_info["nic_id"]:
            return render.xml_response(out)
    raise _not_found("NIC", request.match_info["nic_id"])


async def reported_devices(request: web.Request) -> web.Response:
    vm = _vm(request)
    items = []
    if vm.guest_agent and vm.status == "up":
        for i, n in enumerate(vm.nics):
            dev = types.ReportedDevice(
                id=lab_id("reporteddevice", f"{vm.name}/{n}"),
                name=f"eth{i}",
                type=types.ReportedDeviceType.NETWORK,
                mac=types.Mac(address=_mac(vm, n)),
                ips=[types.Ip(address=f"192.0.2.{10 + i}", version=types.IpVersion.V4)],
                vm=_ref(types.Vm, "vms", vm.id),
            )
            dev.href = f"{API}/vms/{vm.id}/reporteddevices/{dev.id}"
            items.append(dev)
    return render.xml_response(items, root="reported_devices")


async def permissions(request: web.Request) -> web.Response:
    inv, vm = request.app[INVENTORY], _vm(request)
    perm = types.Permission(
        id=lab_id("permission", f"{inv.username}/SuperUser"),
        role=_ref(types.Role, "roles", "00000000-0000-0000-0000-000000000001"),  # SuperUser
        user=_ref(types.User, "users", lab_id("user", inv.username)),
        vm=_ref(types.Vm, "vms", vm.id),
    )
    perm.href = f"{API}/vms/{vm.id}/permissions/{perm.id}"
    return render.xml_response([perm], root="permissions")


# --- disk snapshots ---------------------------------------------------------------------------


def _chain(request: web.Request, disk: Disk, include_active: bool) -> list[types.DiskSnapshot]:
    """The disk's volumes, base first: snapshot volumes, then (optionally) the active one."""
    a = act(request)
    volumes: list[Volume] = [
        s.volumes[disk.id] for s in a.snapshots.values() if disk.id in s.volumes and not s.deleting
    ]
    out: list[types.DiskSnapshot] = []
    parent: str | None = None
    for v in volumes:
        out.append(_disk_snapshot(disk, v.id, v.fmt == "qcow2", parent))
        parent = v.id
    if include_active:
        cow = disk.format == "cow" or parent is not None
        out.append(_disk_snapshot(disk, disk.image_id, cow, parent))
    return out


def _disk_snapshot(disk: Disk, volume_id: str, cow: bool, parent: str | None) -> object:
    out = types.DiskSnapshot(
        id=volume_id,
        alias=disk.alias,
        name=disk.alias,
        format=types.DiskFormat.COW if cow else types.DiskFormat.RAW,
        provisioned_size=disk.provisioned_size,
        actual_size=disk.actual_size,
        status=types.DiskStatus.OK,
        storage_type=types.DiskStorageType.IMAGE,
        content_type=types.DiskContentType.DATA,
        disk=_ref(types.Disk, "disks", disk.id),
        parent=types.DiskSnapshot(id=parent) if parent else None,
        storage_domains=[_ref(types.StorageDomain, "storagedomains", disk.storage_domain_id)],
    )
    out.href = f"{API}/storagedomains/{disk.storage_domain_id}/disksnapshots/{volume_id}"
    return out


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


async def disk_snapshots(request: web.Request) -> web.Response:
    inv = request.app[INVENTORY]
    disk = inv.disks.get(request.match_info["id"])
    if disk is None:
        raise _not_found("disk", request.match_info["id"])
    items = _chain(request, disk, _flag(request, "include_active"))
    return render.xml_response(items, root="disk_snapshots")


def _domain_snapshots(request: web.Request) -> list[types.DiskSnapshot]:
    inv = request.app[INVENTORY]
    sd_id = request.match_info["id"]
    if sd_id not in inv.storage_domains:
        raise _not_found("storage domain", sd_id)
    active = _flag(request, "include_active")
    return [
        ds
        for d in inv.disks.values()
        if d.storage_domain_id == sd_id
        for ds in _chain(request, d, active)
    ]


async def domain_disk_snapshots(request: web.Request) -> web.Response:
    return render.xml_response(_domain_snapshots(request), root="disk_snapshots")


async def domain_disk_snapshot(request: web.Request) -> web.Response:
    wanted = request.match_info["ds_id"]
    inv = request.app[INVENTORY]
    sd_id = request.match_info["id"]
    if sd_id not in inv.storage_domains:
        raise _not_found("storage domain", sd_id)
    for d in inv.disks.values():
        if d.storage_domain_id == sd_id:
            for ds in _chain(request, d, include_active=True):
                if ds.id == wanted:
                    return render.xml_response(ds)
    raise _not_found("disk snapshot", wanted)


# --- events -----------------------------------------------------------------------------------


async def add_event(request: web.Request) -> web.Response:
    a = act(request)
    body = await _body(request, types.Event)
    if not isinstance(body, types.Event):
        raise Fault(400, "the request body is not an <event>")
    missing = [f for f in EVENT_FIELDS if getattr(body, f) is None]
    if missing:
        raise Fault(
            400, f"[Event [{', '.join(missing)}] required for add]", "Incomplete parameters"
        )
    severity = body.severity.value
    if body.origin.lower() == "ovirt":
        raise Fault(400, "[Cannot add Event. The origin oVirt is reserved for the engine.]")
    if any(e.origin == body.origin and e.custom_id == body.custom_id for e in a.events):
        raise Fault(
            400,
            f"[Cannot add Event. An event with origin {body.origin} and custom id "
            f"{body.custom_id} exists.]",
        )
    event = Event(
        len(a.events) + 1,
        EXTERNAL_EVENT[severity],
        severity,
        body.description,
        body.vm.id if body.vm is not None else None,
        origin=body.origin,
        custom_id=body.custom_id,
    )
    a.events.append(event)
    out = render_event(event)
    return render.xml_response(out, status=201)


def routes() -> list[web.RouteDef]:
    """The routes; handlers read ``api.INVENTORY`` and ``backup_api.ACTIVITY``."""
    return [
        web.get(f"{API}/templates", templates),
        web.get(f"{API}/templates/{{id}}", template),
        web.get(f"{API}/networks", networks),
        web.get(f"{API}/networks/{{id}}", network),
        web.get(f"{API}/vms/{{id}}/nics", nics),
        web.get(f"{API}/vms/{{id}}/nics/{{nic_id}}", nic),
        web.get(f"{API}/vms/{{id}}/reporteddevices", reported_devices),
        web.get(f"{API}/vms/{{id}}/permissions", permissions),
        web.get(f"{API}/disks/{{id}}/disksnapshots", disk_snapshots),
        web.get(f"{API}/storagedomains/{{id}}/disksnapshots", domain_disk_snapshots),
        web.get(f"{API}/storagedomains/{{id}}/disksnapshots/{{ds_id}}", domain_disk_snapshot),
        web.post(f"{API}/events", add_event),
    ]
