"""Model records → ``ovirtsdk4.types`` objects → XML responses the SDK accepts.

Every response body is written by the SDK's own writer (``ovirtsdk4.writer.Writer``), so it
can only contain what the SDK's schema knows. Traps this module exists to avoid
(API-NOTES § 1.2, § 10):

- the SDK rejects any body whose Content-Type is not ``application/xml`` or ``text/xml``,
  errors included: a plain-text 404 becomes a generic ``Error`` instead of ``NotFoundError``,
  so every error here is a ``<fault>`` with ``application/xml``;
- the writers cannot write ``<link rel=…>``; a sub-collection is an empty ``ovirtsdk4.List``
  with an ``href``, which the SDK reads back and ``Connection.follow_link`` follows;
- dates must be tz-aware or the SDK hands clients naive datetimes.
"""

from collections.abc import Sequence

import ovirtsdk4
from aiohttp import web
from ovirtsdk4 import types
from ovirtsdk4.writer import Writer

from plugins.lab.engine import state

API = "/ovirt-engine/api"
XML = "application/xml"


def xml_response(obj: object, *, root: str | None = None, status: int = 200) -> web.Response:
    """Serialize one SDK object, or a list of them under ``root`` (e.g. ``"vms"``)."""
    body = Writer.write(obj, root=root) if isinstance(obj, list) else Writer.write(obj)
    return web.Response(status=status, text=body, content_type=XML, charset="utf-8")


def fault(status: int, reason: str, detail: str) -> web.Response:
    """An engine-style error; the SDK raises AuthError for 401/403, NotFoundError for 404."""
    return xml_response(types.Fault(reason=reason, detail=detail), status=status)


def link(path: str) -> ovirtsdk4.List:
    return ovirtsdk4.List(f"{API}/{path}")


def _ref(cls: type, collection: str, obj_id: str) -> object:
    """A bare ``<kind id=… href=…/>`` reference to another object."""
    ref = cls(id=obj_id)
    ref.href = f"{API}/{collection}/{obj_id}"
    return ref


def _version(v: tuple[int, int]) -> types.Version:
    return types.Version(major=v[0], minor=v[1])


def data_center(dc: state.DataCenter) -> types.DataCenter:
    out = types.DataCenter(
        id=dc.id,
        name=dc.name,
        local=False,
        status=types.DataCenterStatus.UP,
        storage_format=types.StorageFormat.V5,
        version=_version(dc.version),
    )
    out.href = f"{API}/datacenters/{dc.id}"
    return out


def cluster(c: state.Cluster) -> types.Cluster:
    out = types.Cluster(
        id=c.id,
        name=c.name,
        version=_version(c.version),
        data_center=_ref(types.DataCenter, "datacenters", c.data_center_id),
        cpu=types.Cpu(architecture=types.Architecture.X86_64, type="Secure Intel Nehalem Family"),
    )
    out.href = f"{API}/clusters/{c.id}"
    return out


def _host_storage(sd: state.StorageDomain) -> types.HostStorage:
    kind = types.StorageType(sd.storage_type)
    if sd.block:  # a volume group on LUNs; no export path
        return types.HostStorage(type=kind, volume_group=types.VolumeGroup(id=f"vg-{sd.id}"))
    return types.HostStorage(type=kind, address="127.0.0.1", path="/lab")


def storage_domain(sd: state.StorageDomain, *, in_data_center: bool = False) -> types.StorageDomain:
    """``sd`` as ``storagedomains/{id}`` serves it, or (``in_data_center``) as
    ``datacenters/{dc}/storagedomains/{id}`` does. Only the latter carries an attached
    domain's status; the top level shows the status of an unattached domain only (as the
    engine: ``StorageDomainMapper`` fills it from the pool's map, empty outside a pool)."""
    out = types.StorageDomain(
        id=sd.id,
        name=sd.name,
        type=types.StorageDomainType.DATA,
        storage=_host_storage(sd),
        master=sd.master,
        available=sd.available,
        used=sd.used,
        committed=0,
        block_size=512,
        external_status=types.ExternalStatus.OK,
        storage_format=types.StorageFormat.V5,
        data_centers=[types.DataCenter(id=sd.data_center_id)] if sd.attached else None,
    )
    if in_data_center or not sd.attached:
        out.status = types.StorageDomainStatus(sd.status)
    if in_data_center:
        out.data_center = types.DataCenter(id=sd.data_center_id)
        out.href = f"{API}/datacenters/{sd.data_center_id}/storagedomains/{sd.id}"
    else:
        out.href = f"{API}/storagedomains/{sd.id}"
    return out


def host(h: state.Host) -> types.Host:
    out = types.Host(
        id=h.id,
        name=h.name,
        address="127.0.0.1",
        status=types.HostStatus.UP,
        type=types.HostType.RHEL,
        cluster=_ref(types.Cluster, "clusters", h.cluster_id),
    )
    out.href = f"{API}/hosts/{h.id}"
    return out


def disk(d: state.Disk) -> types.Disk:
    """A disk as ``DiskMapper`` writes it. A direct LUN has ``lun_storage`` (the LUN and its
    size) and no provisioned_size, format, image, status or storage domain."""
    if d.storage_type == "lun":
        lun = types.Disk(
            id=d.id,
            name=d.alias,
            alias=d.alias,
            storage_type=types.DiskStorageType.LUN,
            shareable=d.shareable,
            lun_storage=types.HostStorage(
                type=types.StorageType.ISCSI,
                logical_units=[
                    types.LogicalUnit(
                        id=f"36001405{d.id.replace('-', '')[:24]}",
                        size=d.provisioned_size,
                        vendor_id="LIO-ORG",
                        product_id="lab",
                    )
                ],
            ),
            content_type=types.DiskContentType.DATA,
        )
        lun.href = f"{API}/disks/{d.id}"
        return lun
    out = types.Disk(
        id=d.id,
        name=d.alias,
        alias=d.alias,
        image_id=d.image_id,
        provisioned_size=d.provisioned_size,
        actual_size=d.actual_size,
        total_size=d.actual_size,
        format=types.DiskFormat(d.format),
        qcow_version=types.QcowVersion.QCOW2_V3 if d.format == "cow" else None,
        sparse=d.sparse,
        backup=types.DiskBackup(d.backup),
        status=types.DiskStatus(d.status),
        storage_type=types.DiskStorageType.IMAGE,
        content_type=types.DiskContentType.DATA,
        shareable=d.shareable,
        storage_domains=[_ref(types.StorageDomain, "storagedomains", d.storage_domain_id)],
    )
    out.href = f"{API}/disks/{d.id}"
    return out


def attachment(vm: state.Vm, a: state.Attachment, full_disk: state.Disk | None = None) -> object:
    """A VM's disk attachment; ``full_disk`` inlines the disk (``follow=…disk``)."""
    out = types.DiskAttachment(
        id=a.disk_id,
        interface=types.DiskInterface(a.interface),
        bootable=a.bootable,
        active=a.active,
        read_only=a.read_only,
        pass_discard=False,
        uses_scsi_reservation=False,
        disk=disk(full_disk) if full_disk else _ref(types.Disk, "disks", a.disk_id),
        vm=_ref(types.Vm, "vms", vm.id),
    )
    if a.snapshot_id is not None:
        out.disk.snapshot = types.Snapshot(id=a.snapshot_id)
    out.href = f"{API}/vms/{vm.id}/diskattachments/{a.disk_id}"
    return out


def tag(t: state.Tag) -> types.Tag:
    out = types.Tag(id=t.id, name=t.name, parent=types.Tag(id=state.ROOT_TAG_ID))
    out.href = f"{API}/tags/{t.id}"
    return out


def vm(
    v: state.Vm,
    *,
    attachments: Sequence[object] | None = None,
    tags: Sequence[types.Tag] | None = None,
    ovf: str | None = None,
) -> types.Vm:
    """A VM; ``attachments``/``tags`` inline those sub-collections, else they are links.

    ``ovf`` (given for ``all_content``) goes to ``initialization.configuration``. A running VM
    with a guest agent reports ``guest_operating_system`` and ``fqdn``; without one (or down)
    both stay empty, as on a real engine (API-NOTES § 7.1)."""
    agent = v.guest_agent and v.status == "up"
    out = types.Vm(
        id=v.id,
        name=v.name,
        status=types.VmStatus(v.status),
        type=types.VmType.SERVER,
        memory=v.memory,
        cpu=types.Cpu(topology=types.CpuTopology(sockets=v.sockets, cores=v.cores, threads=1)),
        os=types.OperatingSystem(type=v.os_type),
        bios=types.Bios(type=types.BiosType.Q35_SEA_BIOS),
        cluster=_ref(types.Cluster, "clusters", v.cluster_id),
        host=_ref(types.Host, "hosts", v.host_id) if v.host_id else None,
        template=_ref(types.Template, "templates", state.BLANK_TEMPLATE_ID),
        original_template=_ref(types.Template, "templates", state.BLANK_TEMPLATE_ID),
        disk_attachments=(
            list(attachments) if attachments is not None else link(f"vms/{v.id}/diskattachments")
        ),
        tags=list(tags) if tags is not None else link(f"vms/{v.id}/tags"),
        initialization=configuration(ovf) if ovf is not None else None,
        guest_operating_system=(
            types.GuestOperatingSystem(
                family="Linux",
                distribution="Red Hat Enterprise Linux",
                architecture="x86_64",
                kernel=types.Kernel(version=types.Version(full_version="5.14.0-427.el9.x86_64")),
            )
            if agent
            else None
        ),
        fqdn=f"{v.name}.lab.example" if agent else None,
        snapshots=link(f"vms/{v.id}/snapshots"),
        nics=link(f"vms/{v.id}/nics"),
        reported_devices=link(f"vms/{v.id}/reporteddevices"),
        permissions=link(f"vms/{v.id}/permissions"),
    )
    out.href = f"{API}/vms/{v.id}"
    return out


def configuration(ovf: str) -> types.Initialization:
    """``<initialization><configuration type=ovf data=…/>`` as the engine writes an OVF."""
    return types.Initialization(
        configuration=types.Configuration(type=types.ConfigurationType.OVF, data=ovf)
    )
