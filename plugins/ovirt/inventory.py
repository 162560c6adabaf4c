"""What the engine has: clusters, hosts, storage domains, VMs and their disks, as frozen values.

Every function takes an ``EngineClient`` and makes its SDK requests in one ``client.call``
(one worker thread, one connection), so a result is read in a single pass and nothing here
blocks the event loop. Results are plain frozen dataclasses with the engine's wire spellings
for enums (``"up"``, ``"cow"``, ``"virtio_scsi"``); no SDK object leaves this module.

Errors are the client's (``EngineNotFound``, ``EngineUnavailable``…) plus ``DataMoverNotFound``
and ``DataMoverAmbiguous`` (both ``ConfigError``: the DataMover setting must be fixed).

VM search: ``vms()`` sends what the engine's search language can express (``cluster=``,
``tag=``, and ``name=`` when the glob uses only ``*``) and then filters the answer again with
exact, case-sensitive ``fnmatch`` semantics, so the result does not depend on how an engine
version interprets its search language.
"""

import asyncio
import fnmatch
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk

from engine.core.errors import ConfigError
from plugins.ovirt.client import EngineClient

# Inside a VM the engine writes the VM id as the SMBIOS system UUID (API-NOTES § 3).
PRODUCT_UUID_PATH = Path("/sys/class/dmi/id/product_uuid")

# Inline attachments, their disks and tags in the VM answer: one request instead of 1 + 2N.
VM_FOLLOW = "disk_attachments.disk,tags"

_PLAIN_VALUE = re.compile(r"[\w.*-]+")


class DataMoverNotFound(ConfigError):
    template = "oVirt engine {url}: no DataMover VM matches {criterion}"


class DataMoverAmbiguous(ConfigError):
    template = "oVirt engine {url}: {count} VMs match DataMover {criterion}: {names}"


@dataclass(frozen=True, slots=True)
class ClusterRef:
    id: str
    name: str
    data_center_id: str | None
    version: tuple[int, int] | None  # compatibility level; decides the backup mode


@dataclass(frozen=True, slots=True)
class HostRef:
    id: str
    name: str
    cluster_id: str | None
    status: str | None
    address: str | None


@dataclass(frozen=True, slots=True)
class StorageDomainRef:
    id: str
    name: str
    type: str | None  # data, iso, export…
    available: int | None  # bytes
    used: int | None  # bytes
    master: bool
    storage_type: str | None = None  # nfs, iscsi, fcp, glusterfs, localfs, posixfs…
    data_center_ids: tuple[str, ...] = ()  # the data centers it is attached to (none: unattached)

    @property
    def block(self) -> bool:
        """Block storage (iSCSI, FC): thin disks are qcow2 volumes of a fixed allocation."""
        return self.storage_type in ("iscsi", "fcp")


@dataclass(frozen=True, slots=True)
class DiskRef:
    """A disk as attached to one VM (the attachment id is the disk id)."""

    id: str
    name: str  # the alias
    provisioned_size: int  # virtual bytes
    actual_size: int | None  # allocated bytes
    format: str  # "cow" (qcow2) or "raw"
    interface: str | None  # virtio, virtio_scsi, sata, ide…
    bootable: bool
    active: bool  # plugged
    incremental: bool  # backup=incremental: checkpoints (dirty extents) are possible
    storage_domain_id: str | None
    image_id: str | None  # the active volume
    status: str | None
    storage_type: str = "image"  # "image"; "lun" (direct LUN), "managed_block_storage"…
    shareable: bool = False

    @property
    def skip_reason(self) -> str | None:
        """Why no backup flow reads this disk, or None. The engine leaves direct LUNs and
        shareable disks out of backups and snapshots (API-NOTES § 4.2), and neither has an
        image a transfer could read."""
        if self.storage_type != "image":
            return f"a {self.storage_type} disk (not an image in a storage domain): not backed up"
        if self.shareable:
            return "a shareable disk (the engine excludes it from backups and snapshots)"
        return None


@dataclass(frozen=True, slots=True)
class VmRef:
    id: str
    name: str
    cluster_id: str | None
    cluster: str | None  # cluster name
    status: str | None
    host_id: str | None  # set while running
    tags: tuple[str, ...]
    disks: tuple[DiskRef, ...]


# --- listing ----------------------------------------------------------------------------------


async def clusters(client: EngineClient) -> list[ClusterRef]:
    """All clusters, in the engine's order."""
    return await client.call(
        lambda c: [_cluster(x) for x in _system(c).clusters_service().list()], "list clusters"
    )


async def hosts(client: EngineClient) -> list[HostRef]:
    """All hosts, in the engine's order."""
    return await client.call(
        lambda c: [_host(x) for x in _system(c).hosts_service().list()], "list hosts"
    )


async def storage_domains(client: EngineClient) -> list[StorageDomainRef]:
    """All storage domains, in the engine's order."""
    return await client.call(
        lambda c: [_storage_domain(x) for x in _system(c).storage_domains_service().list()],
        "list storage domains",
    )


async def storage_domain_status(client: EngineClient, data_center_id: str, sd_id: str) -> str:
    """The domain's status in the data center (active, maintenance, inactive, locked…),
    from ``datacenters/{dc}/storagedomains/{sd}``: the top-level ``storagedomains`` has no
    status for an attached domain (the pool holds it). ``unknown`` when the engine gives
    none; ``EngineNotFound`` when the domain is not attached there."""

    def read(conn: sdk.Connection) -> str:
        dc = _system(conn).data_centers_service().data_center_service(data_center_id)
        sd = dc.storage_domains_service().storage_domain_service(sd_id).get()
        return _enum(sd.status) or "unknown"

    return await client.call(read, "read storage domain status", obj=f"storage domain {sd_id}")


async def vms(
    client: EngineClient,
    cluster: str | None = None,
    name_glob: str | None = None,
    tag: str | None = None,
) -> list[VmRef]:
    """VMs (with their disks) in ``cluster`` (by name), named like ``name_glob`` (``fnmatch``,
    case-sensitive) and carrying ``tag``; None means any. An unknown cluster or tag gives [].
    """
    terms = []
    for field, value in (("cluster", cluster), ("name", name_glob), ("tag", tag)):
        if value is not None and (term := _search_term(field, value)) is not None:
            terms.append(term)
    search = " and ".join(terms) or None

    def read(conn: sdk.Connection) -> list[VmRef]:
        names = _cluster_names(conn)
        listed = (
            _system(conn).vms_service().list(search=search, case_sensitive=True, follow=VM_FOLLOW)
        )
        out = [_vm(conn, v, names) for v in listed]
        return [
            v
            for v in out
            if (cluster is None or v.cluster == cluster)
            and (name_glob is None or fnmatch.fnmatchcase(v.name, name_glob))
            and (tag is None or tag in v.tags)
        ]

    return await client.call(read, "list VMs", obj=f"VMs where {search or 'any'}")


async def vm(client: EngineClient, vm_id: str) -> VmRef:
    """One VM with its disks. Raises ``EngineNotFound`` naming the id when it does not exist."""

    def read(conn: sdk.Connection) -> VmRef:
        got = _system(conn).vms_service().vm_service(vm_id).get(follow=VM_FOLLOW)
        return _vm(conn, got, _cluster_names(conn))

    return await client.call(read, "get VM", obj=f"VM {vm_id}")


async def vm_disks(client: EngineClient, vm_id: str) -> list[DiskRef]:
    """The disks attached to a VM, in attachment order. Raises ``EngineNotFound`` for the id."""

    def read(conn: sdk.Connection) -> list[DiskRef]:
        got = _system(conn).vms_service().vm_service(vm_id).get(follow="disk_attachments.disk")
        return _disks(conn, got)

    return await client.call(read, "list VM disks", obj=f"VM {vm_id}")


# --- the DataMover ----------------------------------------------------------------------------


async def datamover_vm(
    client: EngineClient, name: str | None = None, host_uuid: str | None = None
) -> VmRef:
    """The VM Tessera runs in (the DataMover), found by ``name`` or by SMBIOS UUID.

    With ``name``: the VM with exactly that name. Otherwise ``host_uuid``, or when that is None
    the UUID read from ``/sys/class/dmi/id/product_uuid`` (readable by root only): the VM whose
    id is that UUID (the engine writes the VM id as the SMBIOS UUID), else the VM whose serial
    number is that UUID (some serial policies). Both given: both must name the same VM.
    Raises ``DataMoverNotFound`` when none matches, ``DataMoverAmbiguous`` when several do,
    ``ConfigError`` when the UUID cannot be read.
    """
    url = client.config.url
    if name is not None:
        found = await vms(client, name_glob=_escape_glob(name))
        by_name = _pick_one([v for v in found if v.name == name], url, f"name {name!r}")
        if host_uuid is not None and by_name.id.lower() != host_uuid.strip().lower():
            raise DataMoverNotFound(url=url, criterion=f"name {name!r} and UUID {host_uuid}")
        return by_name
    uuid = (host_uuid if host_uuid is not None else await _read_product_uuid()).strip().lower()

    def read(conn: sdk.Connection) -> list[VmRef]:
        service = _system(conn).vms_service()
        try:
            return [_vm(conn, service.vm_service(uuid).get(follow=VM_FOLLOW), _cluster_names(conn))]
        except sdk.NotFoundError:
            pass
        # Not the VM id: fall back to serial numbers (needs every VM, so only as a fallback).
        listed = service.list()
        matches = [v for v in listed if _serial(v) == uuid]
        names = _cluster_names(conn)
        return [_vm(conn, service.vm_service(v.id).get(follow=VM_FOLLOW), names) for v in matches]

    found = await client.call(read, "find DataMover VM", obj=f"VM with UUID {uuid}")
    return _pick_one(found, url, f"UUID {uuid}")


def _pick_one(found: list[VmRef], url: str, criterion: str) -> VmRef:
    if not found:
        raise DataMoverNotFound(url=url, criterion=criterion)
    if len(found) > 1:
        names = ", ".join(f"{v.name} ({v.id})" for v in found)
        raise DataMoverAmbiguous(url=url, count=len(found), criterion=criterion, names=names)
    return found[0]


async def _read_product_uuid() -> str:
    try:
        return await asyncio.to_thread(PRODUCT_UUID_PATH.read_text, encoding="ascii")
    except OSError as e:
        raise ConfigError(
            message=f"cannot read this machine's UUID from {PRODUCT_UUID_PATH} ({e}); "
            "run as root inside the DataMover VM or configure its name"
        ) from None


def _serial(v: Any) -> str | None:
    serial = getattr(v, "serial_number", None)
    value = getattr(serial, "value", None) if serial is not None else None
    return str(value).strip().lower() if value else None


# --- SDK objects → values (run in worker threads) ---------------------------------------------


def _system(conn: sdk.Connection) -> Any:
    return conn.system_service()


def _enum(value: Any) -> str | None:
    if value is None:
        return None
    return str(value.value) if isinstance(value, Enum) else str(value)


def _id(ref: Any) -> str | None:
    return str(ref.id) if ref is not None and ref.id is not None else None


def _cluster_names(conn: sdk.Connection) -> dict[str, str]:
    return {str(c.id): str(c.name) for c in _system(conn).clusters_service().list()}


def _cluster(c: Any) -> ClusterRef:
    version = (int(c.version.major), int(c.version.minor)) if c.version is not None else None
    return ClusterRef(
        id=str(c.id), name=str(c.name), data_center_id=_id(c.data_center), version=version
    )


def _host(h: Any) -> HostRef:
    return HostRef(
        id=str(h.id),
        name=str(h.name),
        cluster_id=_id(h.cluster),
        status=_enum(h.status),
        address=h.address,
    )


def _storage_domain(s: Any) -> StorageDomainRef:
    return StorageDomainRef(
        id=str(s.id),
        name=str(s.name),
        type=_enum(s.type),
        available=s.available,
        used=s.used,
        master=bool(s.master),
        storage_type=_enum(s.storage.type) if s.storage is not None else None,
        data_center_ids=tuple(str(dc.id) for dc in s.data_centers or ()),
    )


def _vm(conn: sdk.Connection, v: Any, cluster_names: dict[str, str]) -> VmRef:
    cluster_id = _id(v.cluster)
    tags = _expand(conn, v.tags)
    return VmRef(
        id=str(v.id),
        name=str(v.name),
        cluster_id=cluster_id,
        cluster=cluster_names.get(cluster_id) if cluster_id else None,
        status=_enum(v.status),
        host_id=_id(v.host),
        tags=tuple(str(t.name) for t in tags),
        disks=tuple(_disks(conn, v)),
    )


def _disks(conn: sdk.Connection, v: Any) -> list[DiskRef]:
    """The VM's disks; follows the links the engine did not inline (``follow=`` ignored)."""
    out = []
    for a in _expand(conn, v.disk_attachments):
        disk = a.disk
        if disk.provisioned_size is None and disk.storage_type is None:
            disk = conn.follow_link(disk)  # a bare <disk id href/>: not inlined
        out.append(
            DiskRef(
                id=str(disk.id),
                name=str(disk.alias or disk.name),
                provisioned_size=_size(disk),
                actual_size=disk.actual_size,
                format=_enum(disk.format) or "raw",
                interface=_enum(a.interface),
                bootable=bool(a.bootable),
                active=a.active is not False,
                incremental=_enum(disk.backup) == "incremental",
                storage_domain_id=_id(disk.storage_domains[0]) if disk.storage_domains else None,
                image_id=disk.image_id,
                status=_enum(disk.status),
                storage_type=_enum(disk.storage_type) or "image",
                shareable=bool(disk.shareable),
            )
        )
    return out


def _size(disk: Any) -> int:
    """The virtual size; a direct LUN has no provisioned_size, only its LUN's size."""
    if disk.provisioned_size is not None:
        return int(disk.provisioned_size)
    units = disk.lun_storage.logical_units if disk.lun_storage is not None else None
    return sum(int(u.size or 0) for u in units or ())


def _expand(conn: sdk.Connection, items: Any) -> list[Any]:
    """An inlined sub-collection as a list; an empty one that is only a link is followed."""
    if items is None:
        return []
    if not items and getattr(items, "href", None):
        return list(conn.follow_link(items))
    return list(items)


def _search_term(field: str, value: str) -> str | None:
    """``field=value`` in the engine's search language, or None when it cannot be written there.

    The engine's answer only has to be a superset of the exact result (a ``*`` in a cluster
    or tag name widens it), because ``vms()`` filters again client-side.
    """
    if field == "name" and any(ch in value for ch in "?["):
        return None  # fnmatch's ? and [...] have no engine equivalent
    if _PLAIN_VALUE.fullmatch(value):
        return f"{field}={value}"
    if '"' in value:
        return None
    return f'{field}="{value}"'


def _escape_glob(name: str) -> str:
    """A glob matching exactly ``name`` (``*``, ``?`` and ``[`` taken literally)."""
    return re.sub(r"([*?\[])", r"[\1]", name)
