"""Flow 3, LAN free: disks attached to the DataMover VM and read (or written) as local devices.

Backup (``SnapshotAttachSource``, DESIGN §6 flow 3, API-NOTES § 7)::

    open():  OVF + guest facts (as flow 2); POST vms/{vm}/snapshots (our id, recorded
             first) ──poll──▶ ok
             per disk: record the attachment, then POST vms/{datamover}/diskattachments
                       <disk id=D><snapshot id=S/></disk> active=true virtio_scsi (transient)
                       ──wait──▶ BY_ID/<name ending in the disk id's first 20 chars>
                       qemu-nbd --read-only -f raw <device> (recorded), one control
                       connection for base:allocation
    read:    N NBD readers of the local export; a device has no extent information, so
             zero slots are found after reading (the pipeline hashes them to the zero id)
    close(): stop the exports, DELETE each attachment (detach_only), DELETE the snapshot
             and poll until gone: on success, failure and cancellation alike

Restore (``AttachVmRestore``, API-NOTES § 8.5): each disk is created (``VmRestore.add_disk``),
attached to the DataMover (no snapshot, active), found by serial, written through a writable
qemu-nbd over the device (``plugins.local.target.LocalTargetDisk``: the existing restore
path), flushed and fsynced, detached; then ``create_vm`` attaches the disks to the new VM as
the imageio path does. A failed disk is detached and deleted; leaving the restore without a
VM deletes every disk (``VmRestore``).

Device discovery: the engine sets the disk's serial to its id; the guest sees the first 20
characters (virtio-blk: ``virtio-<20>``; virtio-scsi: udev's ``scsi-0QEMU_QEMU_HARDDISK_<20>``,
or the full id in ``scsi-…`` links of newer QEMU). A name matches when the part after a known
prefix starts with those 20 characters; ``-partN`` links never match. The directory is
``datamover.by_id_dir`` (the lab points it at its own); two matches are an error, not a guess.

Journal keys: ``engine``, ``snapshot`` (flow 2's, removed by ``backup.recover``),
``attachments`` (``{vm_id, disk_id}``, written before each POST) and ``attach_exports``
(each qemu-nbd's private directory, written before the process starts, and its pid once
known). ``recover`` stops the exports (found by directory, see ``engine.io.qemu``) and
detaches the disks (a disk no longer attached is done, ``idempotent``); it runs before
``backup.recover`` (the snapshot and new disks cannot go while attached).
"""

import asyncio
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.config.models import DataMoverSection
from engine.core.errors import ConfigError, EngineError
from engine.core.extent import Extent
from engine.io import qemu
from engine.io.nbd.client import NbdClient, connect, extents
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, VmInfo
from engine.store.manifest import DiskEntry
from engine.util import failpoints
from plugins.local.source import export_records, stop_exports
from plugins.local.target import DEFAULT_MAX_CONNECTIONS, LocalTargetDisk
from plugins.ovirt.backup import OvirtSourceBase
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.idempotent import Steps, Wanted, already_done
from plugins.ovirt.inventory import VmRef, datamover_vm
from plugins.ovirt.restore import CLEANUP_TIMEOUT, VmRestore
from plugins.ovirt.snapshot import (
    FULL_READ,
    OvirtSnapshotError,
    remove_snapshot,
    wait_snapshot,
)

log = structlog.get_logger("tessera.ovirt.attach")

SERIAL_PREFIX: Final = 20  # serial bytes a guest sees (VIRTIO_BLK_ID_BYTES; SCSI device id)
BY_ID_PREFIXES: Final = ("virtio-", "scsi-0QEMU_QEMU_HARDDISK_", "scsi-SQEMU_QEMU_HARDDISK_")
DEVICE_POLL: Final = 0.1  # seconds between looks for the device: udev links it in ~100 ms


class OvirtAttachError(EngineError):
    template = "disk {disk} on DataMover {datamover}: {reason}"


# --- devices -----------------------------------------------------------------------------------


def find_devices(by_id_dir: Path, disk_id: str) -> list[Path]:
    """The by-id links whose serial part starts with the first 20 chars of ``disk_id``."""
    prefix = disk_id[:SERIAL_PREFIX].lower()
    try:
        names = sorted(os.listdir(by_id_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if "-part" in name or name.endswith(".tmp"):
            continue
        for known in BY_ID_PREFIXES:
            if name.startswith(known) and name[len(known) :].lower().startswith(prefix):
                found.append(by_id_dir / name)
    return found


async def wait_device(by_id_dir: Path, disk_id: str, timeout: float, datamover: str) -> Path:
    """The device of ``disk_id`` once it exists (a link that resolves); raises
    ``OvirtAttachError`` after ``timeout`` seconds, or at once for two different devices."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [p for p in find_devices(by_id_dir, disk_id) if p.exists()]
        if len({os.path.realpath(p) for p in found}) > 1:
            raise OvirtAttachError(
                disk=disk_id,
                datamover=datamover,
                reason=f"several devices match its serial: {', '.join(map(str, found))}",
            )
        if found:
            return found[0]
        if loop.time() > deadline:
            raise OvirtAttachError(
                disk=disk_id,
                datamover=datamover,
                reason=f"no device with serial {disk_id[:SERIAL_PREFIX]} appeared in "
                f"{by_id_dir} within {timeout:g} s",
            )
        await asyncio.sleep(DEVICE_POLL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- engine calls ------------------------------------------------------------------------------


def _attachments(conn: sdk.Connection, vm_id: str) -> Any:
    return conn.system_service().vms_service().vm_service(vm_id).disk_attachments_service()


async def attach_disk(
    client: EngineClient, datamover: VmRef, disk_id: str, snapshot_id: str | None = None
) -> None:
    """Attach ``disk_id`` (as of ``snapshot_id``: transient) to the DataMover, plugged."""
    disk = t.Disk(id=disk_id, snapshot=t.Snapshot(id=snapshot_id) if snapshot_id else None)
    body = t.DiskAttachment(
        disk=disk,
        active=True,
        bootable=False,
        interface=t.DiskInterface.VIRTIO_SCSI,
        pass_discard=False,
    )

    def add(conn: sdk.Connection) -> Any:
        return _attachments(conn, datamover.id).add(body)

    what = f"disk {disk_id} to DataMover {datamover.name}"
    await client.call(add, "attach disk", obj=what, idempotent=False)


async def detach_disk(
    client: EngineClient, vm_id: str, disk_id: str, *, failpoint: str | None = None
) -> bool:
    """Detach (never delete) ``disk_id`` from the VM; False if it was not attached (404,
    ``idempotent.already_done``). ``failpoint`` (crash tests) is hit after a detach."""

    def remove(conn: sdk.Connection) -> bool:
        try:
            _attachments(conn, vm_id).attachment_service(disk_id).remove(detach_only=True)
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    detached = await client.call(remove, "detach disk", obj=f"disk {disk_id} from VM {vm_id}")
    if failpoint is not None and detached:
        failpoints.hit(failpoint)
    return detached


async def find_datamover(client: EngineClient, section: DataMoverSection | None) -> VmRef:
    """The DataMover VM of the configuration (``datamover.vm_name`` or ``host_uuid``)."""
    if section is None:
        raise ConfigError(message="the snapshot-attach flow needs a datamover section")
    return await datamover_vm(client, section.vm_name, section.host_uuid)


# --- backup ------------------------------------------------------------------------------------


class _NbdReader:
    def __init__(self, client: NbdClient) -> None:
        self._client = client

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self._client.readinto(offset, buf)

    async def close(self) -> None:
        await self._client.close()


class _DeviceDisk:
    """A ``SourceDisk``: the attached snapshot disk's device behind a read-only qemu-nbd."""

    def __init__(
        self, info: DiskInfo, reason: str | None, export: qemu.QemuNbd, control: NbdClient
    ) -> None:
        self.info = info
        self.checkpoint_parent: str | None = None  # every run reads fully
        self.fallback_reason = reason
        self.export = export
        self.control = control

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return [e async for e in extents(self.control, offset, length, "base:allocation")]

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        raise RuntimeError("the snapshot-attach flow never reads incrementally")

    async def open_reader(self) -> _NbdReader:
        return _NbdReader(await connect(self.export.address, meta_contexts=()))

    async def release(self) -> None:
        """Nothing to free early: the session's ``close`` stops the export."""


class AttachSession:
    """The snapshot with its disks attached to the DataMover; ``checkpoint`` is None."""

    def __init__(
        self,
        client: EngineClient,
        vm: VmInfo,
        snapshot_id: str,
        consistency: str,
        datamover: VmRef,
    ) -> None:
        self.client = client
        self.vm = vm
        self.snapshot_id = snapshot_id
        self.consistency = consistency
        self.datamover = datamover
        self.attached: list[str] = []  # disk ids, also those whose POST may have failed
        self.exports: list[qemu.QemuNbd] = []
        self._disks: list[_DeviceDisk] = []

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self._disks

    @property
    def checkpoint(self) -> str | None:
        return None

    async def close(self, success: bool) -> None:
        """Stop the exports, detach every disk, remove the snapshot; errors are collected and
        raised together (``OvirtSnapshotError``) after every step was tried."""
        errors: list[str] = []
        for disk in self._disks:
            try:
                await disk.control.close()
            except Exception as e:  # noqa: BLE001 - a broken connection must not keep disks attached
                errors.append(f"disk {disk.info.disk_id}: closing its export connection: {e!r}")
        for export in self.exports:
            await export.stop()  # never raises: terminates, kills, reaps
        for disk_id in reversed(self.attached):
            try:
                await detach_disk(
                    self.client, self.datamover.id, disk_id, failpoint="ovirt.attach.detached"
                )
            except EngineError as e:
                errors.append(str(e))
        try:
            await remove_snapshot(
                self.client, self.vm.vm_id, self.snapshot_id, failpoint="ovirt.attach.remove"
            )
        except EngineError as e:
            errors.append(str(e))
        if errors:
            raise OvirtSnapshotError(
                vm=self.vm.name, snapshot=self.snapshot_id, reason="; ".join(errors)
            )


class SnapshotAttachSource(OvirtSourceBase):
    """One oVirt VM backed up through a snapshot whose disks are attached to the DataMover."""

    def __init__(
        self,
        client: EngineClient,
        vm: VmRef,
        config: dict[str, Any],
        datamover: VmRef,
        section: DataMoverSection,
        *,
        require_quiesce: bool = False,
    ) -> None:
        super().__init__(client, vm, config, require_quiesce=require_quiesce)
        self.datamover = datamover
        self.section = section

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> AttachSession:
        vm = self.vm
        if vm.id == self.datamover.id:
            raise ConfigError(message=f"VM {vm.name} is the DataMover: it cannot back itself up")
        disks, skipped = self.readable_disks()
        ovf, consistency = await self.facts()
        snapshot_id = str(uuid.uuid4())
        record("engine", self._config)
        record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})  # before it exists
        body = t.Snapshot(
            id=snapshot_id,
            description=f"Tessera {new_checkpoint}",
            persist_memorystate=False,
            disk_attachments=[t.DiskAttachment(disk=t.Disk(id=d.id)) for d in disks],
        )

        def create(conn: sdk.Connection) -> Any:
            vms = conn.system_service().vms_service()
            return vms.vm_service(vm.id).snapshots_service().add(body)

        created = await self.client.call(
            create, "create snapshot", obj=f"VM {vm.name}", idempotent=False
        )
        if created.id != snapshot_id:  # an engine that picks its own id
            snapshot_id = created.id
            record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})
        reason = FULL_READ if parent_checkpoint is not None else None
        attributes = {"consistency": consistency, "snapshot": snapshot_id, "transport": "attach"}
        info = VmInfo(
            vm.id,
            vm.name,
            tuple(
                DiskInfo(
                    d.id,
                    d.name,
                    d.provisioned_size,
                    {
                        "format": d.format,
                        "interface": d.interface or "",
                        "bootable": str(d.bootable).lower(),
                        "storage_domain": d.storage_domain_id or "",
                    }
                    | attributes,
                )
                for d in disks
            ),
            config=ovf,
            config_format="ovf",
            skipped=skipped,
        )
        session = AttachSession(self.client, info, snapshot_id, consistency, self.datamover)
        try:
            await wait_snapshot(self.client, vm.id, snapshot_id)
            for dinfo in info.disks:
                session._disks.append(
                    await self._open_disk(session, dinfo, reason, readers, record)
                )
        except BaseException as e:
            try:
                await session.close(success=False)
            except EngineError as cleanup:  # keep the first error; say what is left
                log.warning("attach cleanup failed", vm=vm.name, error=str(cleanup))
                e.add_note(f"cleanup: {cleanup}")
            raise
        return session

    async def _open_disk(
        self,
        session: AttachSession,
        dinfo: DiskInfo,
        reason: str | None,
        readers: int,
        record: ResourceRecorder,
    ) -> _DeviceDisk:
        dm = self.datamover
        session.attached.append(dinfo.disk_id)
        record("attachments", [{"vm_id": dm.id, "disk_id": d} for d in session.attached])
        await attach_disk(self.client, dm, dinfo.disk_id, session.snapshot_id)
        device = await wait_device(
            self.section.by_id_dir, dinfo.disk_id, self.section.device_timeout, dm.name
        )
        export = qemu.QemuNbd(device, "raw", read_only=True, shared=readers + 2)
        export.prepare()
        session.exports.append(export)
        record("attach_exports", export_records(session.exports))  # before the process exists
        await export.start()
        record("attach_exports", export_records(session.exports))  # now with its pid
        control = await connect(export.address, meta_contexts=["base:allocation"])
        if control.export_size < dinfo.size:
            await control.close()
            raise OvirtAttachError(
                disk=dinfo.disk_id,
                datamover=dm.name,
                reason=f"device {device} has {control.export_size} bytes; the disk has "
                f"{dinfo.size}",
            )
        return _DeviceDisk(dinfo, reason, export, control)


# --- restore -----------------------------------------------------------------------------------


class _DiskViaDataMover:
    """``AttachVmRestore.make_target``'s context manager for one manifest disk: a new disk
    attached to the DataMover, written through a local qemu-nbd over its device."""

    def __init__(self, vr: "AttachVmRestore", entry: DiskEntry, record: ResourceRecorder):
        self._vr = vr
        self._entry = entry
        self._record = record
        self._disk_id: str | None = None
        self._attached = False
        self._export: qemu.QemuNbd | None = None
        self._target: LocalTargetDisk | None = None
        self._device: Path | None = None

    def _created(self, disk_id: str) -> None:
        self._disk_id = disk_id

    def _journal_export(self, export: qemu.QemuNbd) -> None:
        """Journal a prepared export, before its process starts (it is stopped with the
        others on release, and found by its directory by recovery)."""
        self._vr.exports.append(export)
        self._record("attach_exports", export_records(self._vr.exports))

    async def __aenter__(self) -> LocalTargetDisk:
        try:
            return await self._open()
        except BaseException as e:
            await self._cleanup(e)
            raise

    async def _open(self) -> LocalTargetDisk:
        vr, entry = self._vr, self._entry
        dm = await vr.datamover()
        created, sparse = await vr.add_disk(entry, self._record, self._created)
        vr.attachments.append(created.id)
        self._record("attachments", [{"vm_id": dm.id, "disk_id": d} for d in vr.attachments])
        self._attached = True
        await attach_disk(vr.client, dm, created.id)
        self._device = await wait_device(
            vr.section.by_id_dir, created.id, vr.section.device_timeout, dm.name
        )
        self._export = await _serve_writable(self._device, self._journal_export)
        probe = await connect(self._export.address, meta_contexts=())
        size = probe.export_size
        await probe.close()
        if size < entry.size:
            raise OvirtAttachError(
                disk=created.id,
                datamover=dm.name,
                reason=f"device {self._device} has {size} bytes; the disk needs {entry.size}",
            )
        info = DiskInfo(created.id, entry.name, entry.size, dict(entry.attributes))
        # A new sparse disk reads as zeroes: zero slots need no write (as the imageio path).
        self._target = LocalTargetDisk(info, sparse, self._export, DEFAULT_MAX_CONNECTIONS)
        return self._target

    async def _release(self) -> None:
        """Close the writers, stop the export, fsync the device, detach the disk."""
        vr = self._vr
        target, self._target = self._target, None
        export, self._export = self._export, None
        try:
            if target is not None:
                await target.close_writers()
        finally:
            if export is not None:
                await export.stop()
            for stopped in [e for e in vr.exports if e.workdir is None]:
                vr.exports.remove(stopped)  # this disk's, also failed attempts
        if self._device is not None and self._device.exists():
            await asyncio.to_thread(_fsync, self._device)
        if self._attached and self._disk_id is not None:
            dm = await vr.datamover()
            await detach_disk(vr.client, dm.id, self._disk_id)
            self._attached = False
            vr.attachments.remove(self._disk_id)

    async def _cleanup(self, error: BaseException) -> None:
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                await self._release()
        except Exception as e:  # noqa: BLE001 - the restore's own error is the one to raise
            log.warning("restore cleanup failed", disk=self._disk_id, error=str(e))
            error.add_note(f"cleanup of disk {self._disk_id} failed: {e}")
        await self._vr._cleanup_disk(self._disk_id, None, None, error)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._disk_id is not None
        if exc is not None:
            await self._cleanup(exc)
            return
        try:
            await self._release()
        except BaseException as e:
            await self._cleanup(e)
            raise
        self._vr.disks.append((self._entry, self._disk_id))


async def _serve_writable(device: Path, journal: Callable[[qemu.QemuNbd], None]) -> qemu.QemuNbd:
    """qemu-nbd over the device, O_DIRECT first (a block device takes it; a FUSE file may
    not, then the page cache is used and the fsync at the end makes it durable). Each
    attempt is prepared and given to ``journal`` before its process starts."""
    last: Exception | None = None
    for cache in ("none", "writeback"):
        export = qemu.QemuNbd(
            device, "raw", read_only=False, cache=cache, shared=DEFAULT_MAX_CONNECTIONS
        )
        export.prepare()
        journal(export)
        try:
            await export.start()
        except qemu.QemuError as e:
            last = e
            continue
        return export
    assert last is not None
    raise last


class AttachVmRestore(VmRestore):
    """``VmRestore`` whose disks are written through the DataMover (module docstring).

    Made by ``restore.vm_restore(..., factory=partial(AttachVmRestore, section=...))``."""

    def __init__(self, *args: Any, section: DataMoverSection | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if section is None:
            raise ConfigError(message="restore through the DataMover needs a datamover section")
        self.section = section
        self.attachments: list[str] = []  # disk ids attached to the DataMover now
        self.exports: list[qemu.QemuNbd] = []
        self._datamover: VmRef | None = None

    async def datamover(self) -> VmRef:
        if self._datamover is None:
            self._datamover = await find_datamover(self.client, self.section)
        return self._datamover

    def make_target(self, entry: DiskEntry, record: ResourceRecorder) -> _DiskViaDataMover:  # type: ignore[override]
        record("engine", self.recovery)
        self._record = record  # create_vm records the new VM with it (recovery deletes it)
        return _DiskViaDataMover(self, entry, record)


# --- recovery ----------------------------------------------------------------------------------


async def recover(resources: dict[str, Any], committed: bool) -> list[str]:
    """Stop the qemu-nbd exports of devices and detach the disks a killed job attached to
    the DataMover (``backup.recover`` then removes the snapshot or the new disks).

    Each step runs even when another failed; a disk no longer attached needs nothing
    (``idempotent.Steps``). Raises ``OvirtRecoveryError`` naming every step that failed."""
    attachments = resources.get("attachments") or []
    engine = resources.get("engine")
    steps = Steps()
    exports = resources.get("attach_exports", [])
    try:
        steps.done += await stop_exports(exports)
    except Exception as e:  # noqa: BLE001 - the detaches below must still run
        steps.errors.append(f"stop the DataMover's qemu-nbd exports: {e}")
    if attachments and engine:
        config = EngineConfig.from_record(engine)
        async with EngineClient(config) as client:
            for a in reversed(attachments):
                await steps.run(
                    detach_disk(client, a["vm_id"], a["disk_id"]),
                    f"detach disk {a['disk_id']} from DataMover VM {a['vm_id']}",
                    f"detached disk {a['disk_id']} from DataMover VM {a['vm_id']}",
                )
    return steps.result()
