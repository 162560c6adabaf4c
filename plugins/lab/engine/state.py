"""The fake engine's inventory: a seed a person writes, and the model built from it.

A ``Seed`` names things (VMs, disks, clusters) and refers to other things by name. ``Inventory
.from_seed`` validates it once and turns it into frozen records that refer to each other by id.
Ids are UUID5s of the kind and name, so the same seed always yields the same ids (tests and
demo scripts may hard-code them). Enum-valued fields hold the engine's wire spelling (``"up"``,
``"cow"``, ``"virtio_scsi"``), checked against the SDK's enums when the seed is loaded.

The records are frozen; only the restore and attachment endpoints (``restore``,
``attach_api``) change an ``Inventory``'s tables (add and remove disks and VMs, replace a
record: a new disk's status, a VM's attachments). Snapshots and the rest of the backup state
live in ``backup.Activity``.
"""

import uuid
from dataclasses import dataclass, field
from typing import Final, TypeVar

from ovirtsdk4 import types

from engine.core.errors import ConfigError

GiB = 1024**3

# All lab ids derive from this namespace; changing it changes every id a demo may have saved.
LAB_NAMESPACE = uuid.UUID("5d1c2f1e-6b8a-4a52-9a57-7e55e5a1ab00")
ROOT_TAG_ID = "00000000-0000-0000-0000-000000000000"  # the engine's fixed root tag
BLANK_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"  # the engine's fixed Blank template


def lab_id(kind: str, name: str) -> str:
    """The stable id of the object of ``kind`` (``"vm"``, ``"disk"``…) called ``name``."""
    return str(uuid.uuid5(LAB_NAMESPACE, f"{kind}/{name}"))


# --- the seed: what a person writes -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiskSeed:
    """One disk of a VM. ``alias`` must be unique across the seed."""

    alias: str
    size: int  # virtual (provisioned) bytes
    format: str = "cow"  # cow = qcow2, raw = raw
    interface: str = "virtio_scsi"
    bootable: bool = False
    sparse: bool = True
    backup: str = "incremental"  # "incremental" enables checkpoints, "none" full backups only
    storage_domain: str = "data1"
    actual_size: int | None = None  # None: size if preallocated, else 0 until images exist
    # "image" (a volume in a storage domain) or "lun": a direct LUN, which the engine shows
    # with ``lun_storage`` and no provisioned_size, format, image or storage domain; the lab
    # has no image for it. ``size`` is then the LUN's size.
    storage_type: str = "image"
    # Attached to several VMs at once (raw only, no checkpoints): the engine leaves it out of
    # backups and snapshots (API-NOTES § 4.2 DisksFilter ONLY_NOT_SHAREABLE).
    shareable: bool = False
    # What the lab writes on the disk (``plugins.lab.disks``): "ext4", one filesystem on the
    # whole disk (quick to build); "partitioned", a guest's layout: MBR with ext4, XFS and
    # NTFS partitions and an LVM volume (``plugins.lab.guest_disk``: libguestfs, ≥ 600 MiB).
    layout: str = "ext4"


LAYOUTS: Final = ("ext4", "partitioned")


@dataclass(frozen=True, slots=True)
class VmSeed:
    name: str
    cluster: str = "Default"
    status: str = "up"
    host: str | None = "host1"  # only meaningful while status is up
    memory: int = 2 * GiB
    sockets: int = 1
    cores: int = 2
    os_type: str = "rhel_9x64"
    disks: tuple[DiskSeed, ...] = ()
    tags: tuple[str, ...] = ()
    nics: tuple[str, ...] = ()  # NIC names; none means one default "nic1" (in the OVF)
    # A responsive guest agent: the engine then reports guest_operating_system and fqdn for
    # the running VM (the only hint a client has that snapshots can be quiesced, API-NOTES
    # § 7.1). False: those stay empty and snapshots of the running VM are crash-consistent.
    guest_agent: bool = True
    # User snapshots the VM has when the engine starts, oldest first, by description: each
    # is made as ``POST snapshots`` makes one, and the guest then writes to the active layer
    # (``snapshots.seed``), so the VM's disks are real chains.
    snapshots: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Seed:
    """Everything the fake engine knows at start. Names are unique per kind."""

    username: str = "admin@internal"
    password: str = "lab"  # noqa: S105 - a throw-away lab credential, loopback only
    data_center: str = "Default"
    clusters: tuple[str, ...] = ("Default",)
    compat_version: tuple[int, int] = (4, 7)  # cluster level; ≥ 4.4 means incremental backup
    # Clusters whose level is not ``compat_version``: (name, level). The data center's level
    # is the lowest of its clusters'.
    cluster_levels: tuple[tuple[str, tuple[int, int]], ...] = ()
    # engine-config UseHybridBackup at cluster levels 4.7 and 4.8, true as in the real engine
    # (it is false for ≤ 4.6): a plain backup of a VM there is snapshot-based (API-NOTES
    # § 4.1, ``hybrid``); ``?legacy=true`` or False here make it live.
    use_hybrid_backup: bool = True
    storage_domains: tuple[str, ...] = ("data1",)  # file storage (NFS)
    # Block storage domains beside them, (name, "iscsi" | "fcp"): thin disks there are qcow2
    # volumes of a fixed allocation, sparse raw is refused (``volumes``, ``restore``).
    block_storage_domains: tuple[tuple[str, str], ...] = (("block1", "iscsi"),)
    hosts: tuple[tuple[str, str], ...] = (("host1", "Default"),)  # (name, cluster)
    tags: tuple[str, ...] = ()
    vms: tuple[VmSeed, ...] = ()


def demo_seed() -> Seed:
    """A small inventory: two clusters, three VMs with qcow2 and raw disks; db01 also has a
    shareable disk and a direct LUN. "Default" is at level 4.7 (its backups are hybrid) and
    "Prod" at 4.6 (live), so both engine-side backup modes run by default; web02 has a user
    snapshot."""
    return Seed(
        clusters=("Default", "Prod"),
        cluster_levels=(("Prod", (4, 6)),),
        storage_domains=("data1", "data2"),
        hosts=(("host1", "Default"), ("host2", "Prod")),
        tags=("gold", "silver"),
        vms=(
            VmSeed(
                name="web01",
                tags=("gold",),
                disks=(
                    DiskSeed("web01_os", 10 * GiB, bootable=True),
                    DiskSeed("web01_data", 20 * GiB, format="raw", sparse=False, backup="none"),
                ),
            ),
            VmSeed(
                name="web02",
                status="down",
                host=None,
                disks=(DiskSeed("web02_os", 10 * GiB, interface="virtio", bootable=True),),
                snapshots=("Before upgrade",),
            ),
            VmSeed(
                name="db01",
                cluster="Prod",
                host="host2",
                tags=("silver",),
                disks=(
                    DiskSeed("db01_os", 8 * GiB, bootable=True, storage_domain="data2"),
                    DiskSeed("db01_data", 50 * GiB, interface="sata", storage_domain="data2"),
                    # A cluster quorum disk shared with other VMs, and a direct LUN: the
                    # engine leaves both out of backups and snapshots.
                    DiskSeed(
                        "db01_quorum",
                        1 * GiB,
                        format="raw",
                        sparse=False,
                        backup="none",
                        storage_domain="data2",
                        shareable=True,
                    ),
                    DiskSeed(
                        "db01_lun",
                        100 * GiB,
                        format="raw",
                        sparse=False,
                        backup="none",
                        storage_type="lun",
                    ),
                ),
            ),
        ),
    )


# --- the model: what the engine serves -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataCenter:
    id: str
    name: str
    version: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Cluster:
    id: str
    name: str
    data_center_id: str
    version: tuple[int, int]


@dataclass(frozen=True, slots=True)
class StorageDomain:
    id: str
    name: str
    data_center_id: str
    master: bool
    available: int
    used: int
    storage_type: str = "nfs"  # the engine's StorageType: nfs, iscsi, fcp…
    # The domain's status in its data center (StorageDomainStatus: active, maintenance,
    # inactive, locked…; ``unattached``: in no data center). As on the engine, the
    # top-level ``storagedomains`` shows it only for an unattached domain; an attached
    # one's is served under ``datacenters/{id}/storagedomains``.
    status: str = "active"

    @property
    def attached(self) -> bool:
        return self.status != "unattached"

    @property
    def block(self) -> bool:
        """Whether volumes are logical volumes of a fixed size (iSCSI, FC)."""
        return self.storage_type in ("iscsi", "fcp")


@dataclass(frozen=True, slots=True)
class Host:
    id: str
    name: str
    cluster_id: str


@dataclass(frozen=True, slots=True)
class Disk:
    id: str
    alias: str
    storage_domain_id: str
    image_id: str  # the active volume
    provisioned_size: int
    actual_size: int
    format: str
    sparse: bool
    backup: str
    status: str = "ok"
    storage_type: str = "image"  # "image" | "lun" (``DiskSeed.storage_type``)
    shareable: bool = False
    layout: str = "ext4"  # what the lab's image holds (``DiskSeed.layout``)

    @property
    def snapable(self) -> bool:
        """Whether backups and snapshots include the disk: neither a LUN nor shareable."""
        return self.storage_type == "image" and not self.shareable


@dataclass(frozen=True, slots=True)
class Attachment:
    """A disk attached to a VM; the engine gives the attachment the disk's id."""

    disk_id: str
    interface: str
    bootable: bool
    active: bool = True
    read_only: bool = False
    snapshot_id: str | None = None  # a snapshot's disk, attached transient (``attach``)


@dataclass(frozen=True, slots=True)
class Vm:
    id: str
    name: str
    cluster_id: str
    status: str
    host_id: str | None
    memory: int
    sockets: int
    cores: int
    os_type: str
    attachments: tuple[Attachment, ...]
    tag_ids: tuple[str, ...]
    nics: tuple[str, ...] = ("nic1",)
    guest_agent: bool = True
    snapshots: tuple[str, ...] = ()  # the seed's user snapshots (``VmSeed.snapshots``)


@dataclass(frozen=True, slots=True)
class Tag:
    id: str
    name: str


@dataclass(slots=True)
class Inventory:
    """All objects by id, in seed order (lists come back in that order)."""

    username: str
    password: str
    use_hybrid_backup: bool = True  # the seed's
    data_centers: dict[str, DataCenter] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    storage_domains: dict[str, StorageDomain] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    disks: dict[str, Disk] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    tags: dict[str, Tag] = field(default_factory=dict)

    @classmethod
    def from_seed(cls, seed: Seed) -> "Inventory":
        """Build the model. Raises ``ConfigError`` naming the first bad reference or value."""
        inv = cls(
            username=seed.username,
            password=seed.password,
            use_hybrid_backup=seed.use_hybrid_backup,
        )
        levels = dict.fromkeys(seed.clusters, seed.compat_version)
        for name, level in seed.cluster_levels:
            if name not in levels:
                raise ConfigError(message=f"seed gives a level to unknown cluster {name!r}")
            levels[name] = level
        dc = DataCenter(
            lab_id("datacenter", seed.data_center),
            seed.data_center,
            min(levels.values(), default=seed.compat_version),
        )
        inv.data_centers[dc.id] = dc
        for name, level in levels.items():
            _add(inv.clusters, Cluster(lab_id("cluster", name), name, dc.id, level))
        for i, name in enumerate(seed.storage_domains):
            sd = StorageDomain(lab_id("sd", name), name, dc.id, i == 0, 500 * GiB, 100 * GiB)
            _add(inv.storage_domains, sd)
        for name, kind in seed.block_storage_domains:
            _check_enum(types.StorageType, kind, f"storage domain {name} type")
            if kind not in ("iscsi", "fcp"):
                raise ConfigError(message=f"storage domain {name}: block types are iscsi, fcp")
            sd = StorageDomain(
                lab_id("sd", name), name, dc.id, False, 500 * GiB, 100 * GiB, storage_type=kind
            )
            _add(inv.storage_domains, sd)
        for name, cluster in seed.hosts:
            _add(inv.hosts, Host(lab_id("host", name), name, _ref(inv.clusters, cluster).id))
        for name in seed.tags:
            _add(inv.tags, Tag(lab_id("tag", name), name))
        for vm in seed.vms:
            inv._add_vm(vm)
        return inv

    def _add_vm(self, seed: VmSeed) -> None:
        _check_enum(types.VmStatus, seed.status, f"VM {seed.name} status")
        host_id = None
        if seed.status == "up" and seed.host is not None:
            host_id = _ref(self.hosts, seed.host).id
        attachments = []
        for d in seed.disks:
            _check_enum(types.DiskFormat, d.format, f"disk {d.alias} format")
            _check_enum(types.DiskInterface, d.interface, f"disk {d.alias} interface")
            _check_enum(types.DiskBackup, d.backup, f"disk {d.alias} backup")
            if d.format == "raw" and d.backup == "incremental":
                raise ConfigError(message=f"disk {d.alias}: incremental backup needs format cow")
            _check_enum(types.DiskStorageType, d.storage_type, f"disk {d.alias} storage_type")
            if d.storage_type not in ("image", "lun"):
                raise ConfigError(message=f"disk {d.alias}: the lab has image and lun disks only")
            if (d.shareable or d.storage_type == "lun") and (
                d.format != "raw" or d.backup != "none"
            ):
                raise ConfigError(
                    message=f"disk {d.alias}: a shareable or LUN disk is raw, without backup"
                )
            if d.layout not in LAYOUTS:
                raise ConfigError(
                    message=f"disk {d.alias}: layout {d.layout!r} is not one of {LAYOUTS}"
                )
            sd = _ref(self.storage_domains, d.storage_domain) if d.storage_type == "image" else None
            if sd is not None and sd.block and d.format == "raw" and d.sparse:
                raise ConfigError(
                    message=f"disk {d.alias}: sparse raw is impossible on block domain {sd.name}"
                )
            actual = d.actual_size if d.actual_size is not None else (0 if d.sparse else d.size)
            disk = Disk(
                id=lab_id("disk", d.alias),
                alias=d.alias,
                storage_domain_id=_ref(self.storage_domains, d.storage_domain).id,
                image_id=lab_id("volume", d.alias),
                provisioned_size=d.size,
                actual_size=actual,
                format=d.format,
                sparse=d.sparse,
                backup=d.backup,
                storage_type=d.storage_type,
                shareable=d.shareable,
                layout=d.layout,
            )
            _add(self.disks, disk, label=disk.alias)
            attachments.append(Attachment(disk.id, d.interface, d.bootable))
        vm = Vm(
            id=lab_id("vm", seed.name),
            name=seed.name,
            cluster_id=_ref(self.clusters, seed.cluster).id,
            status=seed.status,
            host_id=host_id,
            memory=seed.memory,
            sockets=seed.sockets,
            cores=seed.cores,
            os_type=seed.os_type,
            attachments=tuple(attachments),
            tag_ids=tuple(_ref(self.tags, t).id for t in seed.tags),
            nics=seed.nics or ("nic1",),
            guest_agent=seed.guest_agent,
            snapshots=seed.snapshots,
        )
        _add(self.vms, vm)

    def vm_disks(self, vm: Vm) -> list[Disk]:
        return [self.disks[a.disk_id] for a in vm.attachments]


_Obj = TypeVar("_Obj", DataCenter, Cluster, StorageDomain, Host, Disk, Vm, Tag)
_Ref = TypeVar("_Ref", Cluster, StorageDomain, Host, Tag)


def _add(table: dict[str, _Obj], obj: _Obj, label: str | None = None) -> None:
    if obj.id in table:
        raise ConfigError(message=f"duplicate name in seed: {label or getattr(obj, 'name', '')}")
    table[obj.id] = obj


def _ref(table: dict[str, _Ref], name: str) -> _Ref:
    for obj in table.values():
        if obj.name == name:
            return obj
    raise ConfigError(message=f"seed refers to unknown name {name!r}")


def _check_enum(enum: type, value: str, what: str) -> None:
    try:
        enum(value)
    except ValueError:
        raise ConfigError(message=f"{what}: {value!r} is not a valid value") from None
