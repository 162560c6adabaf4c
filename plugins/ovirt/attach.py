"""Flow 3, LAN free: snapshot disks attached to the DataMover VM and read as local devices.

``SnapshotAttachSource`` (DESIGN §6 flow 3, API-NOTES § 7)::

    open():  OVF + guest facts (as flow 2); POST vms/{vm}/snapshots (our id, recorded
             first) ──poll──▶ ok
             per disk: record the attachment, then POST vms/{datamover}/diskattachments
                       <disk id=D><snapshot id=S/></disk> active=true virtio_scsi (transient)
                       ──wait──▶ BY_ID/<name ending in the disk id's first 20 chars>
                       open the device read-only (``engine.io.direct``); smaller than
                       the disk: ``OvirtAttachError``
    read:    N direct readers of the device (``preadv`` in place, no qemu-nbd: the guest
             sees the snapshot's guest data as raw bytes, whatever the volume's format);
             a block device has no extent information, so zero slots are found after
             reading (the pipeline hashes them to the zero id); what was read is dropped
             from the DataMover's page cache (the transient device is read once)
    close(): close the device, DELETE each attachment (detach_only), DELETE the snapshot
             and poll until gone: on success, failure and cancellation alike

The disk's device is found by its serial (``datamover.find_devices``); restores through the
DataMover are ``attach_restore``.

Journal keys: ``engine``, ``snapshot`` (``snapshots.create_snapshot``) and ``attachments``
(``{vm_id, disk_id}``, written before each POST). A killed run leaves no process: the
devices were open only in the process that died. ``recovery.recover`` detaches the disks (a
disk no longer attached is done, ``idempotent``), then removes the snapshot; it still stops
the qemu-nbd exports that ``attach_exports`` names (a restore's, or a backup journaled by a
version that read the device through qemu-nbd).
"""

from collections.abc import Sequence
from typing import Any

import structlog

from engine.config.models import DataMoverSection
from engine.core.errors import ConfigError, EngineError
from engine.core.extent import Extent
from engine.io.direct import DirectImage, DirectReader
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, VmInfo
from plugins.ovirt.base import OvirtSourceBase
from plugins.ovirt.client import EngineClient
from plugins.ovirt.datamover import OvirtAttachError, wait_device
from plugins.ovirt.disks import attach_disk, detach_disk
from plugins.ovirt.inventory import VmRef
from plugins.ovirt.snapshots import (
    FULL_READ,
    OvirtSnapshotError,
    create_snapshot,
    remove_snapshot,
    wait_snapshot,
)

log = structlog.get_logger("tessera.ovirt.attach")


class _DeviceDisk:
    """A ``SourceDisk``: the attached snapshot disk's device, read directly."""

    def __init__(self, info: DiskInfo, reason: str | None, device: DirectImage) -> None:
        self.info = info
        self.checkpoint_parent: str | None = None  # every run reads fully
        self.fallback_reason = reason
        self.device = device

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.device.extents(offset, length)

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        raise RuntimeError("the snapshot-attach flow never reads incrementally")

    async def open_reader(self) -> DirectReader:
        return await self.device.open_reader()

    async def release(self) -> None:
        """Nothing to free early: the session's ``close`` closes the device."""


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
        self.devices: list[DirectImage] = []  # open, to be closed before detaching
        self._disks: list[_DeviceDisk] = []

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self._disks

    @property
    def checkpoint(self) -> str | None:
        return None

    async def close(self, success: bool) -> None:
        """Close the devices, detach every disk, remove the snapshot; errors are collected
        and raised together (``OvirtSnapshotError``) after every step was tried."""
        errors: list[str] = []
        for device in self.devices:
            try:
                await device.close()
            except OSError as e:  # a failed close must not keep disks attached
                errors.append(f"disk {device.disk}: closing its device {device.path}: {e!r}")
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
        disks: Sequence[str] = (),
    ) -> None:
        super().__init__(client, vm, config, require_quiesce=require_quiesce, disks=disks)
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
        await record("engine", self._config)
        snapshot_id = await create_snapshot(self.client, vm, disks, new_checkpoint, record)
        reason = FULL_READ if parent_checkpoint is not None else None
        attributes = {"consistency": consistency, "snapshot": snapshot_id, "transport": "attach"}
        info = self.vm_info(disks, ovf, skipped, attributes)
        session = AttachSession(self.client, info, snapshot_id, consistency, self.datamover)
        try:
            await wait_snapshot(self.client, vm.id, snapshot_id)
            for dinfo in info.disks:
                session._disks.append(await self._open_disk(session, dinfo, reason, record))
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
        record: ResourceRecorder,
    ) -> _DeviceDisk:
        dm = self.datamover
        session.attached.append(dinfo.disk_id)
        await record("attachments", [{"vm_id": dm.id, "disk_id": d} for d in session.attached])
        await attach_disk(
            self.client, dm.id, dm.name, dinfo.disk_id, snapshot_id=session.snapshot_id
        )
        path = await wait_device(
            self.section.by_id_dir, dinfo.disk_id, self.section.device_timeout, dm.name
        )
        # The transient device is read once and goes away: its pages are of no further use.
        device = await DirectImage.open(path, disk=dinfo.disk_id, drop_cache=True)
        session.devices.append(device)
        if device.size < dinfo.size:
            raise OvirtAttachError(
                disk=dinfo.disk_id,
                datamover=dm.name,
                reason=f"device {path} has {device.size} bytes; the disk has {dinfo.size}",
            )
        return _DeviceDisk(dinfo, reason, device)
