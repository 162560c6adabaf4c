"""Restore a snapshot into the engine as a new VM, over the LAN (API-NOTES § 8.1–§ 8.4).

::

    async with vm_restore(engine, manifest, ovf, options) as vr:     # or VmRestore(...)
        outcome = await run_restore(..., plugin="ovirt", make_target=vr.make_target)
        if outcome succeeded:
            vm = await vr.create_vm()        # the new VM, down, with the disks attached

    per disk (``vr.make_target(entry, record)``, an async context manager → TargetDisk):
      enter: POST disks (floating; format/size/sparse/backup from the manifest, storage
             domain from the options or the recorded one) → id recorded in the journal
             ──poll──▶ ok;  POST imagetransfers (upload, raw) → recorded ──poll──▶
             transferring;  ImageioDisk.connect(transfer_url, proxy_url), extending the
             transfer's ticket until closed (``transfers.open_image``)
      exit:  success: finalize, wait finished_success (the engine checks a qcow2 volume)
             failure: cancel, wait finished_*, DELETE the disk
    create_vm(): POST vms from the snapshot's OVF (``regenerate_ids``: the original VM may
             still exist) under the new name and cluster, or from plain fields when the
             snapshot has no OVF; the id is recorded; then one POST diskattachments per
             disk with the recorded interface and bootable flag, active.
    leaving ``VmRestore`` before ``create_vm()`` returned (an error, a failed or cancelled
             restore job): the new VM (if any) and every disk created are deleted.

A new sparse disk is ``fresh`` (zero slots need no write); a preallocated one gets its zero
slots written, since preallocated storage is not guaranteed to read as zeroes.

Several disks at once: ``run_restore`` keeps up to ``disks_at_once`` targets open and enters
them one at a time in manifest order, so disks and transfers are created (and journaled) in
that order and a disk's transfer exists only while the disk is written (none waits idle for
its turn, which the engine's inactivity timeout would cancel). The journal lists are rebuilt
from the shared ``disk_ids`` / ``transfer_ids`` at every change, so concurrent targets never
drop each other's entries. ``create_vm`` attaches the disks in manifest order, whatever
order their uploads finished in.

On a block storage domain (iSCSI, FC) a thin disk is created as qcow2 with ``initial_size``
(a sparse raw one too: the engine refuses sparse raw there), so that the upload fits its
volume, which the engine does not extend during a transfer (``volumes``). Both the imageio
and the DataMover restore create their disks here (``add_disk``).

Journal keys (``ResourceRecorder``): ``engine``, ``restore_disks``, ``restore_transfers`` and
``restore_vm``; ``recovery.recover`` cancels and deletes what a killed restore left.
A process killed after the restore job succeeded but before ``create_vm`` finished leaves
the disks (the job is no longer unfinished): the operator deletes them.

Before the first disk, ``vm_restore`` checks the target (``preflight``): the cluster, the
new name, every storage domain (exists, attached and active, room for the new disks); a
target that fails any check raises one ``RestoreTargetError`` listing every problem, with
nothing created.

Raised: ``RestoreTargetError`` (``preflight``), ``OvirtRestoreError`` (a disk or transfer
that fails on the engine), the ``EngineError`` subclasses of ``client``, the
``ImageioError`` subclasses from writers. Cleanup failures are
logged and added as notes to the error being raised; they never replace it.
"""

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Final, Self

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.config.models import EngineSection
from engine.core.errors import ConfigError, EngineError
from engine.sources.types import DiskInfo, ResourceRecorder, TargetDisk
from engine.store.manifest import DiskEntry, Manifest
from engine.util import failpoints
from plugins.ovirt import inventory, preflight, volumes
from plugins.ovirt.client import EngineClient, EngineConfig, EngineNotFound
from plugins.ovirt.disks import attach_disk, delete_disk, delete_vm, detach_disk
from plugins.ovirt.imageio import ImageioDisk
from plugins.ovirt.polling import Wait
from plugins.ovirt.transfers import (
    UploadTarget,
    add_transfer,
    cancel_transfer,
    finalize_transfer,
    open_image,
)

log = structlog.get_logger("tessera.ovirt.restore")

DISK_TIMEOUT: Final = 600.0  # a preallocated disk on block storage takes minutes to create
CLEANUP_TIMEOUT: Final = 120.0  # cancelling and deleting must not hang a failed restore
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1/"


class OvirtRestoreError(EngineError):
    template = "restore of VM {vm} into the engine: {reason}"


@dataclass(frozen=True, slots=True)
class RestoreOptions:
    """Where and as what to restore. None: ``name`` = ``<original>-restored``, ``cluster`` =
    the OVF's cluster (else ``Default``), ``storage_domain`` = each disk's recorded one.
    ``cluster`` and ``storage_domain`` are names or ids."""

    name: str | None = None
    cluster: str | None = None
    storage_domain: str | None = None
    into_vm: str | None = None  # an existing VM (name or id): attach the disks to it instead
    disk: str | None = None  # only this disk of the snapshot (name or id), as the job selects
    # The id of a VM that may hold ``name``: it is deleted before the new VM is created (a
    # standby's old VM in a full run). Any other VM of that name fails the pre-flight.
    replaces: str | None = None


@dataclass(frozen=True, slots=True)
class RestoredVm:
    id: str
    name: str
    disk_ids: tuple[str, ...]


def _ref(cls: Any, value: str) -> Any:
    return cls(id=value) if _UUID.match(value) else cls(name=value)


def ovf_disk_facts(ovf: str | None) -> dict[str, dict[str, str]]:
    """Disk id → ``{"sparse": "true"|"false"}`` read from the OVF's DiskSection
    (``ovf:volume-type``); empty for no OVF or one that does not parse."""
    if not ovf:
        return {}
    try:
        env = ET.fromstring(ovf)  # noqa: S314 - our own stored copy of the engine's OVF
    except ET.ParseError:
        return {}
    out: dict[str, dict[str, str]] = {}
    for d in env.iter("Disk"):
        disk_id = (d.get(f"{{{_OVF_NS}}}fileRef") or "").split("/")[0]
        vtype = d.get(f"{{{_OVF_NS}}}volume-type")
        if disk_id and vtype:
            out[disk_id] = {"sparse": str(vtype.lower() == "sparse").lower()}
    return out


def ovf_cluster(ovf: str | None) -> str | None:
    if not ovf:
        return None
    try:
        env = ET.fromstring(ovf)  # noqa: S314 - see ovf_disk_facts
    except ET.ParseError:
        return None
    return env.findtext("Content/ClusterName")


class _DiskUpload:
    """``VmRestore.make_target``'s context manager for one manifest disk (module docstring)."""

    def __init__(self, vr: "VmRestore", entry: DiskEntry, record: ResourceRecorder) -> None:
        self._vr = vr
        self._entry = entry
        self._record = record
        self._disk_id: str | None = None
        self._transfer_id: str | None = None
        self._image: ImageioDisk | None = None

    async def __aenter__(self) -> UploadTarget:
        try:
            return await self._open()
        except BaseException as e:
            await self._vr._cleanup_disk(self._disk_id, self._transfer_id, self._image, e)
            raise

    def _created(self, disk_id: str) -> None:
        self._disk_id = disk_id

    async def _transfer_created(self, transfer_id: str) -> None:
        self._transfer_id = transfer_id
        self._vr.transfer_ids.append(transfer_id)
        ids = list(self._vr.transfer_ids)
        await self._record("restore_transfers", ids)  # right after it exists

    async def _open(self) -> UploadTarget:
        vr, entry = self._vr, self._entry
        await self._record("engine", vr.recovery)
        attrs = dict(entry.attributes)
        created, sparse = await vr.add_disk(entry, self._record, self._created)

        self._image = await open_image(
            vr.client,
            partial(
                add_transfer,  # raw guest data; the engine writes the format
                vr.client,
                f"disk {created.id}",
                disk=t.Disk(id=created.id),
                direction=t.ImageTransferDirection.UPLOAD,
            ),
            self._transfer_created,
            f"VM {vr.name}: upload to disk {entry.name} ({created.id})",
        )
        info = DiskInfo(created.id, entry.name, entry.size, attrs)
        return UploadTarget(info, sparse, self._image)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._disk_id is not None
        assert self._transfer_id is not None
        if exc is not None:
            await self._vr._cleanup_disk(self._disk_id, self._transfer_id, self._image, exc)
            return
        try:
            assert self._image is not None
            await self._image.close()
            await finalize_transfer(
                self._vr.client,
                self._transfer_id,
                what=f"VM {self._vr.name}: upload to disk {self._entry.name} ({self._disk_id})",
            )
        except BaseException as e:
            # A failed finalize leaves the disk illegal: nothing worth keeping.
            await self._vr._cleanup_disk(self._disk_id, self._transfer_id, None, e)
            raise
        self._vr.disks.append((self._entry, self._disk_id))


class VmRestore:
    """One restore of ``manifest`` into the engine as a new VM (module docstring).

    ``ovf`` is the snapshot's stored VM configuration (None: the VM is created from plain
    fields, without CPU or memory). ``recovery`` (engine url/user/password_file/ca_file) is
    recorded in the journal for ``recovery.recover``. The client stays the caller's."""

    def __init__(
        self,
        client: EngineClient,
        manifest: Manifest,
        ovf: str | None,
        options: RestoreOptions,
        recovery: dict[str, Any],
    ) -> None:
        self.client = client
        self.manifest = manifest
        self.ovf = ovf
        self.ovf_facts = ovf_disk_facts(ovf)
        self.options = options
        self.recovery = recovery
        self.name = options.name or f"{manifest.vm_name}-restored"
        self.disk_ids: list[str] = []  # every disk created, in creation order
        self.transfer_ids: list[str] = []
        self.disks: list[tuple[DiskEntry, str]] = []  # uploaded disks: entry, new disk id
        self._order = {d.disk_id: i for i, d in enumerate(manifest.disks)}
        self.vm_id: str | None = None
        self._done = False
        self.vm: RestoredVm | None = None  # set by create_vm
        self._record: ResourceRecorder | None = None  # the job's, for ``restore_vm``
        self._domains: list[inventory.StorageDomainRef] | None = None  # listed once

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        """``run_restore``'s ``make_target``: entering it records ``engine`` first, then
        the disk."""
        self._record = record
        return _DiskUpload(self, entry, record)

    def uploaded(self) -> list[tuple[DiskEntry, str]]:
        """The disks written so far (entry, new disk id), in manifest order: disks restored
        at once finish in any order, and the VM gets them in the snapshot's."""
        return sorted(self.disks, key=lambda d: self._order.get(d[0].disk_id, len(self._order)))

    def recorded(self, entry: DiskEntry) -> preflight.NewDisk:
        """The disk ``add_disk`` creates for ``entry`` as recorded: format, sparseness
        (the manifest's, else the OVF's volume type, else thin for qcow2), storage domain
        (the options', else the recorded one; None when neither), sizes."""
        attrs = dict(entry.attributes)
        fmt = attrs.get("format", "cow")
        sparse_text = attrs.get("sparse") or self.ovf_facts.get(entry.disk_id, {}).get("sparse")
        sparse = sparse_text == "true" if sparse_text else fmt == "cow"
        domain = self.options.storage_domain or attrs.get("storage_domain") or None
        return preflight.NewDisk(
            entry.name, entry.disk_id, domain, fmt, sparse, entry.size, entry.data_bytes
        )

    def chosen(self) -> list[DiskEntry]:
        """The manifest disks this restore creates (``options.disk``, a name or id: only
        that one, as the restore job selects it)."""
        wanted = self.options.disk
        return [d for d in self.manifest.disks if wanted in (None, d.disk_id, d.name)]

    async def preflight(self) -> None:
        """Check the target before any disk is created (``preflight.check``): the
        cluster and the new name unless the disks go into an existing VM (then its
        cluster's data center decides where the domains must be attached), every chosen
        disk's storage domain, its state and space. Raises ``RestoreTargetError`` listing
        every problem, ``ConfigError`` for an unknown ``into_vm``."""
        what = f"restore of VM {self.manifest.vm_name}"
        disks = [self.recorded(e) for e in self.chosen()]
        if self.options.into_vm is not None:
            target = await self.find_target_vm()
            vm = await inventory.vm(self.client, target.id)
            await preflight.check(
                self.client, what=what, disks=disks, cluster=vm.cluster_id, vm_name=None
            )
            return
        await preflight.check(
            self.client,
            what=what,
            disks=disks,
            cluster=self.options.cluster or ovf_cluster(self.ovf) or "Default",
            vm_name=self.name,
            replaces=self.options.replaces,
        )

    async def add_disk(
        self, entry: DiskEntry, record: ResourceRecorder, created_cb: Callable[[str], None]
    ) -> tuple[Any, bool]:
        """Create the floating disk of ``entry`` (format, size, sparse, backup flag from the
        manifest; storage domain from the options or the recorded one), record it in
        ``restore_disks`` (``created_cb`` hears its id at once) and wait until it is ``ok``.
        Returns (the new disk as the engine answered, sparse). Shared by the imageio and the
        DataMover targets."""
        attrs = dict(entry.attributes)
        facts = self.recorded(entry)
        fmt, sparse, domain = facts.format, facts.sparse, facts.domain
        if not domain:
            raise OvirtRestoreError(
                vm=self.manifest.vm_name,
                reason=f"disk {entry.name}: no storage domain recorded; name one",
            )
        incremental = fmt == "cow" and attrs.get("backup") == "incremental"
        sd = await self._storage_domain(domain)
        # On block storage: sparse raw becomes thin qcow2, thin qcow2 gets initial_size.
        want = await volumes.shape(
            fmt, sparse, block=sd.block, virtual=entry.size, data_bytes=entry.data_bytes
        )
        # Into an existing VM the disk sits beside the VM's own: say where it came from.
        alias = entry.name if self.options.into_vm is None else f"{entry.name}-restored"
        body = t.Disk(
            alias=alias,
            name=alias,
            provisioned_size=entry.size,
            initial_size=want.initial_size,
            format=t.DiskFormat(want.format),
            sparse=want.sparse,
            backup=t.DiskBackup.INCREMENTAL if incremental else t.DiskBackup.NONE,
            content_type=t.DiskContentType.DATA,
            storage_domains=[_ref(t.StorageDomain, domain)],
        )

        def add(conn: sdk.Connection) -> Any:
            return conn.system_service().disks_service().add(body)

        created = await self.client.call(
            add, "create disk", obj=f"disk {entry.name}", idempotent=False
        )
        created_cb(created.id)
        self.disk_ids.append(created.id)
        await record("restore_disks", list(self.disk_ids))  # right after it exists
        await self.wait_disk(created.id, entry.name)
        return created, sparse

    async def _storage_domain(self, ref: str) -> inventory.StorageDomainRef:
        """The storage domain named by ``ref`` (an id or a name); listed once per restore.
        Raises ``EngineNotFound`` for an unknown one, before any disk is created."""
        if self._domains is None:
            self._domains = await inventory.storage_domains(self.client)
        for sd in self._domains:
            if ref in (sd.id, sd.name):
                return sd
        raise EngineNotFound(
            url=self.client.config.url, what="create disk", object=f"storage domain {ref}"
        )

    async def wait_disk(self, disk_id: str, name: str) -> None:
        """Poll the new disk until ``ok``; ``illegal`` or a timeout raise."""

        def get(conn: sdk.Connection) -> Any:
            return conn.system_service().disks_service().disk_service(disk_id).get()

        wait = Wait(self.client.clock, DISK_TIMEOUT)
        while True:
            disk = await self.client.call(get, "poll disk", obj=f"disk {disk_id}")
            status = str(disk.status.value) if disk.status is not None else "?"
            if status == "ok":
                return
            if status == "illegal" or wait.expired:
                raise OvirtRestoreError(
                    vm=self.manifest.vm_name, reason=f"new disk {name} ({disk_id}) is {status}"
                )
            await wait.pause()

    async def find_target_vm(self) -> RestoredVm:
        """The existing VM of ``options.into_vm`` (by name or id); ConfigError naming it when
        the engine has no such VM. Called before any disk is created."""
        wanted = self.options.into_vm
        assert wanted is not None
        found = [v for v in await inventory.vms(self.client, name_glob=wanted) if v.name == wanted]
        if not found and _UUID.match(wanted):
            try:
                found = [await inventory.vm(self.client, wanted)]
            except EngineNotFound:
                found = []
        if len(found) != 1:
            raise ConfigError(
                message=f"restore into VM {wanted!r}: the engine has "
                + ("no such VM" if not found else f"{len(found)} VMs of that name")
            )
        return RestoredVm(found[0].id, found[0].name, ())

    async def attach_to_existing(self) -> RestoredVm:
        """``create_vm`` for ``options.into_vm``: attach the uploaded disks to the existing VM
        (not bootable: it has its boot disk). The VM is never deleted; if an attachment
        fails, the disks attached so far are detached so that cleanup can delete them."""
        target = await self.find_target_vm()
        attached: list[str] = []
        try:
            for entry, disk_id in self.uploaded():
                await self._attach(target.id, target.name, entry, disk_id, bootable=False)
                attached.append(disk_id)
        except BaseException:
            for disk_id in attached:
                await self._detach(target.id, disk_id)
            raise
        self._done = True
        self.vm = RestoredVm(target.id, target.name, tuple(d for _, d in self.uploaded()))
        return self.vm

    async def _attach(
        self, vm_id: str, vm_name: str, entry: DiskEntry, disk_id: str, *, bootable: bool
    ) -> None:
        interface = entry.attributes.get("interface") or "virtio_scsi"
        await attach_disk(
            self.client, vm_id, vm_name, disk_id, interface=interface, bootable=bootable
        )

    async def _detach(self, vm_id: str, disk_id: str) -> None:
        try:
            await detach_disk(self.client, vm_id, disk_id)
        except EngineError as e:
            log.warning("detach after a failed restore failed", disk=disk_id, error=str(e))

    async def create_vm(self) -> RestoredVm:
        """Create the VM and attach the uploaded disks; call once, after every disk's
        target closed successfully. The VM id is recorded (``restore_vm``) right after it
        exists, for a killed process; ``VmRestore`` deletes the VM itself if an attachment
        fails. With ``options.into_vm`` the disks go to that existing VM instead."""
        if self.options.into_vm is not None:
            return await self.attach_to_existing()
        cluster_name = self.options.cluster or ovf_cluster(self.ovf) or "Default"
        cluster = _ref(t.Cluster, cluster_name)
        if self.ovf:
            body = t.Vm(
                name=self.name,
                cluster=cluster,
                initialization=t.Initialization(
                    configuration=t.Configuration(type=t.ConfigurationType.OVF, data=self.ovf),
                    regenerate_ids=True,
                ),
            )
        else:
            body = t.Vm(name=self.name, cluster=cluster, template=t.Template(name="Blank"))

        def add(conn: sdk.Connection) -> Any:
            return conn.system_service().vms_service().add(body)

        vm = await self.client.call(add, "create VM", obj=f"VM {self.name}", idempotent=False)
        self.vm_id = vm.id
        if self._record is not None:
            await self._record("restore_vm", vm.id)
        failpoints.hit("ovirt.restore.vm_created")
        for entry, disk_id in self.uploaded():
            bootable = entry.attributes.get("bootable") == "true"
            await self._attach(vm.id, self.name, entry, disk_id, bootable=bootable)
        self._done = True
        self.vm = RestoredVm(vm.id, self.name, tuple(d for _, d in self.uploaded()))
        return self.vm

    async def _cleanup_disk(
        self,
        disk_id: str | None,
        transfer_id: str | None,
        image: ImageioDisk | None,
        error: BaseException,
    ) -> None:
        """Close, cancel and delete what one disk target made; failures become notes."""
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                if image is not None:
                    await image.close()
                if transfer_id is not None:
                    await cancel_transfer(self.client, transfer_id)
                if disk_id is not None:
                    await delete_disk(self.client, disk_id)
                    self.disk_ids.remove(disk_id)
        except Exception as e:  # noqa: BLE001 - the restore's own error is the one to raise
            log.warning("restore cleanup failed", disk=disk_id, error=str(e))
            error.add_note(f"cleanup of disk {disk_id} failed: {e}")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Unless ``create_vm()`` returned: delete the new VM and every disk created."""
        if self._done:
            return
        problems: list[str] = []
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                if self.vm_id is not None:
                    try:
                        await delete_vm(self.client, self.vm_id)
                    except EngineError as e:
                        problems.append(f"VM {self.vm_id}: {e}")
                for disk_id in list(self.disk_ids):
                    try:
                        await delete_disk(self.client, disk_id)
                        self.disk_ids.remove(disk_id)
                    except EngineError as e:
                        problems.append(f"disk {disk_id}: {e}")
        except TimeoutError:
            problems.append(f"cleanup took longer than {CLEANUP_TIMEOUT:.0f} s")
        if problems:
            text = "restore cleanup left objects on the engine: " + "; ".join(problems)
            log.warning(text)
            if exc is not None:
                exc.add_note(text)
            else:
                raise OvirtRestoreError(vm=self.manifest.vm_name, reason=text)


@asynccontextmanager
async def vm_restore(
    engine: EngineSection,
    manifest: Manifest,
    ovf: str | None,
    options: RestoreOptions,
    *,
    factory: Callable[..., VmRestore] = VmRestore,
    api_gate: Callable[[], AbstractAsyncContextManager[object]] | None = None,
) -> AsyncIterator[VmRestore]:
    """A ``VmRestore`` with its own ``EngineClient`` for ``engine`` (closed on exit);
    ``ovf``: the snapshot's stored VM configuration (None: the VM is created from plain
    fields). ``factory`` makes it (same arguments as ``VmRestore``):
    ``attach_restore.AttachVmRestore`` writes the disks through the DataMover instead of
    imageio uploads. The target is checked (``VmRestore.preflight``) before it is given:
    ``RestoreTargetError`` lists every problem, an unknown ``into_vm`` is a ``ConfigError``;
    either way nothing was created."""
    recovery = EngineConfig.from_section(engine).record()
    config = EngineConfig.from_section(engine, gate=api_gate)
    async with (
        EngineClient(config) as client,
        factory(client, manifest, ovf, options, recovery) as vr,
    ):
        await vr.preflight()
        yield vr
