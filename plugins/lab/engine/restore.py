"""Creating and removing disks and VMs: what a restore into the engine needs (API-NOTES § 8).

- ``create_disk``: a floating disk in a storage domain (by id or name); ``provisioned_size``
  and ``format`` are mandatory, a client-supplied ``id`` is honoured, ``backup=incremental``
  needs ``cow``. The image is made at once with ``qemu-img create`` (qcow2 for ``cow``, raw
  otherwise) in ``Activity.images_dir``; the disk starts ``locked`` (event 2020) while "vdsm
  creates the volume": ``Faults.disk_seconds`` of the engine's clock later ``monitor`` makes
  it ``ok`` (``finish_disk``, event 2021), whether anyone polls or not. Only then can it take
  an upload transfer (``transfers.start``) or be attached (``attach_disk``).
  On a block domain (iSCSI, FC) sparse raw is refused (400, as ``AddDiskCommand``), and a
  thin ``cow`` disk is a volume of fixed allocation from ``initial_size`` (else the lab's
  chunk), which uploads and DataMover writes cannot pass (``volumes``); ``initial_size`` is
  ignored on file domains, as vdsm does.
  The domain must be ``active`` in its data center (409 otherwise, as
  ``ACTION_TYPE_FAILED_STORAGE_DOMAIN_STATUS_ILLEGAL2``) and have ``available`` bytes for
  the new volume's allocation (409 "Low disk space", as
  ``ACTION_TYPE_FAILED_DISK_SPACE_LOW_ON_STORAGE_DOMAIN``): the whole size for a
  preallocated disk, the fixed volume for a thin one on block storage, nothing for a thin
  one on file storage (its file grows as it is written; the lab does not count that
  growth). The allocation moves from ``available`` to ``used``, and back when the disk is
  deleted.
- ``create_vm``: a new VM, ``down``, without disks. From an OVF
  (``initialization.configuration`` type ``ovf``) CPU, memory, OS and NICs come from the OVF
  and request fields override them (the name, memory, CPU); without an OVF, ``template`` is
  required and the request's fields (or the Blank template's defaults) are used. An OVF VM id
  that exists is refused unless ``regenerate_ids`` is set; a VM name in use is refused.
  The real engine would re-attach disks whose ids match the OVF's; this fake attaches none.
- ``attach_disk``: ``vms/{id}/diskattachments`` with ``<disk id>``, ``interface``,
  ``bootable``, ``active`` (default false). The disk must be ``ok`` and not attached elsewhere.
- ``delete_vm`` (VM down; its disks go too unless ``detach_only``) and ``delete_disk`` (not
  attached, no transfer in progress). Image files the engine created are deleted; images the
  caller gave ``FakeEngine`` are only forgotten.

Errors raise ``api.Fault`` with the engine's status. The mutating calls take the activity's
lock: they share it with transfers and snapshots.
"""

import os
import uuid
from dataclasses import replace
from typing import TypeVar

from ovirtsdk4 import types

from engine.io import qemu
from plugins.lab.engine import ovf as ovf_mod
from plugins.lab.engine import volumes
from plugins.lab.engine.api import Fault
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.records import TRANSFER_DONE
from plugins.lab.engine.state import Attachment, Disk, GiB, StorageDomain, Vm

DEFAULT_MEMORY = 1 * GiB  # the Blank template's
DEFAULT_OS = "other"
USER_ADD_DISK = 2020  # event codes (API-NOTES § 8.1)
USER_ADD_DISK_FINISHED = 2021


def _domain(a: Activity, ref: types.StorageDomain) -> StorageDomain:
    for sd in a.inventory.storage_domains.values():
        if (ref.id and sd.id == ref.id) or (not ref.id and ref.name and sd.name == ref.name):
            return sd
    raise Fault(404, f"Entity not found: storage domain {ref.id or ref.name}", "Not Found")


_T = TypeVar("_T", int, str)


def _first(*values: _T | None) -> _T:
    """The first value given (not None, not empty), else the last (the default)."""
    for v in values:
        if v:
            return v
    last = values[-1]
    assert last is not None
    return last


def _enum(value: object) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


async def create_disk(a: Activity, body: types.Disk) -> Disk:
    """Validate as ``BackendDisksResource``/``AddDiskCommand``, create the image, record it."""
    if body.provisioned_size is None or body.format is None:
        raise Fault(400, "[Cannot add Virtual Disk. provisioned_size and format are required.]")
    if not body.storage_domains:
        raise Fault(400, "[Cannot add Virtual Disk. A storage domain is required.]")
    if body.provisioned_size <= 0:
        raise Fault(400, "[Cannot add Virtual Disk. The size must be positive.]")
    fmt = _enum(body.format) or "cow"
    backup = _enum(body.backup) or "none"
    if backup == "incremental" and fmt != "cow":
        raise Fault(
            400,
            "[Cannot add Virtual Disk. ACTION_TYPE_FAILED_INCREMENTAL_BACKUP_NOT_SUPPORTED_"
            "FOR_RAW_DISK]",
        )
    sd = _domain(a, body.storage_domains[0])
    sparse = body.sparse if body.sparse is not None else fmt == "cow"
    if sd.block and fmt == "raw" and sparse:
        # AddDiskCommand → ImagesHandler.checkImageConfiguration (ACTION_TYPE_FAILED_DISK_
        # CONFIGURATION_NOT_SUPPORTED): a logical volume cannot be a sparse raw file.
        raise Fault(
            400,
            "[Cannot add Virtual Disk. Disk configuration (RAW Sparse) is incompatible with "
            "the storage domain type.]",
        )
    if sd.status != "active":
        raise Fault(
            409,
            "[Cannot add Virtual Disk. The relevant Storage Domain's status is "
            f"{sd.status.capitalize()}.]",
        )
    if a.images_dir is None:
        raise Fault(409, "[Cannot add Virtual Disk. The lab engine has no images directory.]")
    async with a._lock:
        sd = a.inventory.storage_domains[sd.id]  # its space, as others left it
        allocation = 0 if sparse else body.provisioned_size
        if sd.block and fmt == "cow" and sparse:
            allocation = volumes.allocation(body.initial_size, a.faults.volume_chunk)
        if allocation > sd.available:
            raise Fault(
                409, f"[Cannot add Virtual Disk. Low disk space on Storage Domain {sd.name}.]"
            )
        disk_id = body.id or a.new_id()
        if disk_id in a.inventory.disks:
            raise Fault(409, f"[Cannot add Virtual Disk. Disk {disk_id} already exists.]")
        alias = body.alias or body.name or f"disk_{disk_id[:8]}"
        a.images_dir.mkdir(parents=True, exist_ok=True)
        path = a.images_dir / f"{disk_id}.{'qcow2' if fmt == 'cow' else 'raw'}"
        try:
            await qemu.create(path, "qcow2" if fmt == "cow" else "raw", body.provisioned_size)
        except qemu.QemuError as e:
            raise Fault(409, f"[Cannot add Virtual Disk. {e}]") from e
        actual = allocation
        if sd.block and fmt == "cow" and sparse:
            # A logical volume of a fixed size (``volumes``); the engine reports its size.
            os.truncate(path, max(actual, path.stat().st_size))
            a.volume_sizes[path] = actual
        _allocate(a, sd.id, actual)
        disk = Disk(
            id=disk_id,
            alias=alias,
            storage_domain_id=sd.id,
            image_id=str(uuid.uuid4()),
            provisioned_size=body.provisioned_size,
            actual_size=actual,
            format=fmt,
            sparse=sparse,
            backup=backup,
            status="locked",
        )
        a.inventory.disks[disk.id] = disk
        a.images[disk.id] = path
        a.created_images.add(disk.id)
        a.creating_disks[disk.id] = a.clock.now()
        a.event(USER_ADD_DISK, f"Add-Disk operation of '{alias}' was initiated.", None)
        return disk


def finish_disk(a: Activity, disk_id: str) -> None:
    """The engine's background work (``monitor``, under the lock): vdsm created the new
    disk's volume, so the disk is ``ok`` (event 2021). A disk deleted meanwhile is skipped."""
    a.creating_disks.pop(disk_id, None)
    disk = a.inventory.disks.get(disk_id)
    if disk is None or disk.status != "locked":
        return
    a.inventory.disks[disk_id] = replace(disk, status="ok")
    a.event(USER_ADD_DISK_FINISHED, f"The disk '{disk.alias}' was successfully added.", None)


def _busy(a: Activity, disk_id: str) -> bool:
    return any(t.disk_id == disk_id and t.phase not in TRANSFER_DONE for t in a.transfers.values())


def _owner(a: Activity, disk_id: str) -> Vm | None:
    for v in a.inventory.vms.values():
        if any(x.disk_id == disk_id for x in v.attachments):
            return v
    return None


async def delete_disk(a: Activity, disk_id: str) -> None:
    async with a._lock:
        disk = a.inventory.disks.get(disk_id)
        if disk is None:
            raise Fault(404, f"Entity not found: disk {disk_id}", "Not Found")
        if (vm := _owner(a, disk_id)) is not None:
            raise Fault(409, f"[Cannot remove Virtual Disk. It is attached to VM {vm.name}.]")
        if _busy(a, disk_id) or disk_id in a.creating_disks:  # a transfer, or still created
            raise Fault(409, f"[Cannot remove Virtual Disk. Disk {disk.alias} is locked.]")
        _forget_disk(a, disk)


def _allocate(a: Activity, sd_id: str, size: int) -> None:
    """Move ``size`` bytes of the domain from ``available`` to ``used`` (negative: back)."""
    sd = a.inventory.storage_domains[sd_id]
    a.inventory.storage_domains[sd_id] = replace(
        sd, available=sd.available - size, used=max(0, sd.used + size)
    )


def _forget_disk(a: Activity, disk: Disk) -> None:
    del a.inventory.disks[disk.id]
    if disk.storage_domain_id in a.inventory.storage_domains:
        _allocate(a, disk.storage_domain_id, -disk.actual_size)
    a.creating_disks.pop(disk.id, None)
    path = a.images.pop(disk.id, None)
    if path is not None:
        a.volume_sizes.pop(path, None)
    if disk.id in a.created_images and path is not None:
        a.created_images.discard(disk.id)
        path.unlink(missing_ok=True)
    a.event(2014, f"Disk {disk.alias} was successfully removed.", None)


def create_vm(a: Activity, body: types.Vm) -> Vm:
    """Validate as ``AddVmCommand`` / ``ImportVmFromConfigurationCommand`` and record a new,
    down VM without disks (module docstring)."""
    inv = a.inventory
    if body.cluster is None or not (body.cluster.id or body.cluster.name):
        raise Fault(400, "[Cannot add VM. cluster.id|name is required.]")
    cluster = next(
        (
            c
            for c in inv.clusters.values()
            if c.id == body.cluster.id or (not body.cluster.id and c.name == body.cluster.name)
        ),
        None,
    )
    if cluster is None:
        raise Fault(404, f"Entity not found: cluster {body.cluster.id or body.cluster.name}")
    config = body.initialization.configuration if body.initialization else None
    parsed: ovf_mod.OvfVm | None = None
    if config is not None:
        if _enum(config.type) != "ovf" or not config.data:
            raise Fault(400, "[Cannot add VM. initialization.configuration.type=ovf and data.]")
        try:
            parsed = ovf_mod.parse_ovf(config.data)
        except ValueError as e:
            raise Fault(400, f"[Cannot import VM. {e}]") from None
    elif body.template is None or not (body.template.id or body.template.name):
        raise Fault(400, "[Cannot add VM. template.id|name is required.]")
    name = body.name or (parsed.name if parsed else None)
    if not name:
        raise Fault(400, "[Cannot add VM. name is required.]")
    if any(v.name == name for v in inv.vms.values()):
        raise Fault(409, "[Cannot add VM. Name is already in use.]")
    regenerate = bool(body.initialization and body.initialization.regenerate_ids)
    vm_id = body.id or (parsed.vm_id if parsed and not regenerate else None) or a.new_id()
    if vm_id in inv.vms:
        raise Fault(409, f"[Cannot import VM. VM {vm_id} already exists.]")
    topology = body.cpu.topology if body.cpu and body.cpu.topology else None
    p = parsed or ovf_mod.OvfVm(None, None, None, None, None, None, (), ())
    vm = Vm(
        id=vm_id,
        name=name,
        cluster_id=cluster.id,
        status="down",
        host_id=None,
        memory=_first(body.memory, p.memory, DEFAULT_MEMORY),
        sockets=_first(topology.sockets if topology else None, p.sockets, 1),
        cores=_first(topology.cores if topology else None, p.cores, 1),
        os_type=_first(body.os.type if body.os else None, p.os_type, DEFAULT_OS),
        attachments=(),
        tag_ids=(),
        nics=p.nics or ("nic1",),
        guest_agent=False,
    )
    inv.vms[vm.id] = vm
    code, what = (174, "imported from configuration") if parsed else (34, "created")
    a.event(code, f"VM {vm.name} was {what}.", vm.id)
    return vm


async def attach_disk(a: Activity, vm_id: str, body: types.DiskAttachment) -> Attachment:
    async with a._lock:
        vm = a.vm(vm_id)
        disk_id = body.disk.id if body.disk else body.id
        if not disk_id:
            raise Fault(400, "[Cannot attach Virtual Disk. The lab needs disk.id.]")
        if body.disk is not None and body.disk.snapshot is not None:
            raise Fault(400, "[Cannot attach Virtual Disk. The lab attaches no snapshot disks.]")
        disk = a.inventory.disks.get(disk_id)
        if disk is None:
            raise Fault(404, f"Entity not found: disk {disk_id}", "Not Found")
        if _owner(a, disk_id) is not None:
            raise Fault(409, f"[Cannot attach Virtual Disk. Disk {disk.alias} is attached.]")
        if disk.status != "ok" or _busy(a, disk_id):
            raise Fault(409, f"[Cannot attach Virtual Disk. Disk {disk.alias} is {disk.status}.]")
        if body.interface is None or body.bootable is None:
            raise Fault(400, "[Cannot attach Virtual Disk. interface and bootable are required.]")
        att = Attachment(
            disk_id=disk_id,
            interface=_enum(body.interface) or "virtio",
            bootable=bool(body.bootable),
            active=bool(body.active),
            read_only=bool(body.read_only),
        )
        a.inventory.vms[vm.id] = replace(vm, attachments=(*vm.attachments, att))
        a.event(2016, f"Disk {disk.alias} was attached to VM {vm.name}.", vm.id)
        return att


async def delete_vm(a: Activity, vm_id: str, *, detach_only: bool) -> None:
    async with a._lock:
        vm = a.vm(vm_id)
        if vm.status != "down":
            raise Fault(409, "[Cannot remove VM. VM is running.]")
        if any(s.vm_id == vm_id for s in a.snapshots.values()):
            raise Fault(409, "[Cannot remove VM. The lab removes no VM with snapshots.]")
        if any(_busy(a, x.disk_id) for x in vm.attachments):
            raise Fault(409, "[Cannot remove VM. A disk of the VM is locked.]")
        del a.inventory.vms[vm_id]
        if not detach_only:
            for x in vm.attachments:
                _forget_disk(a, a.inventory.disks[x.disk_id])
        a.event(113, f"VM {vm.name} was successfully removed.", None)
