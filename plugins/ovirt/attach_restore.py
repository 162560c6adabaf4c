"""Restore through the DataMover (``tessera restore --flow attach``, API-NOTES § 8.5): the
disks are written as local devices of the DataMover VM instead of imageio uploads.

Per disk (``AttachVmRestore.make_target``)::

    enter:  create the disk (``VmRestore.add_disk``: recorded, ──poll──▶ ok), record the
            attachment, attach it to the DataMover (no snapshot, active), find its device by
            serial (``datamover.wait_device``), writable qemu-nbd over it (O_DIRECT, else the
            page cache; recorded before it starts) → ``NbdTargetDisk``: the existing
            local restore path
    exit:   close the writers, stop the export, fsync the device, detach the disk

then ``create_vm`` attaches the disks to the new VM as the imageio path does. A failed disk is
detached and deleted; leaving the restore without a VM deletes every disk (``VmRestore``).

Several disks at once (``run_restore``'s ``disks_at_once``): each has its own attachment,
device and qemu-nbd; attaching and detaching on the DataMover take turns (``hotplug``: one
hot-plug or hot-unplug of the DataMover at a time; they are short, and an engine may refuse
a device change on a VM while another one holds it locked), and the DataMover is looked up
once.

Journal keys: ``VmRestore``'s (``engine``, ``restore_disks``, ``restore_vm``), plus
``attachments`` (as the LAN-free backup writes it) and ``attach_exports`` (each writable
qemu-nbd's private directory): ``recovery`` stops the exports and detaches the disks before
it deletes them.
"""

import asyncio
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from engine.config.models import DataMoverSection
from engine.core.errors import ConfigError
from engine.io import qemu
from engine.io.exports import export_records
from engine.io.nbd.client import connect
from engine.restore.nbd_target import DEFAULT_MAX_CONNECTIONS, NbdTargetDisk
from engine.sources.types import DiskInfo, ResourceRecorder, TargetDisk
from engine.store.manifest import DiskEntry
from plugins.ovirt.datamover import (
    OvirtAttachError,
    find_datamover,
    fsync_device,
    serve_writable,
    wait_device,
)
from plugins.ovirt.disks import attach_disk, detach_disk
from plugins.ovirt.inventory import VmRef
from plugins.ovirt.restore import CLEANUP_TIMEOUT, VmRestore

log = structlog.get_logger("tessera.ovirt.attach")


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
        self._target: NbdTargetDisk | None = None
        self._device: Path | None = None

    def _created(self, disk_id: str) -> None:
        self._disk_id = disk_id

    async def _journal_export(self, export: qemu.QemuNbd) -> None:
        """Journal a prepared export, before its process starts (it is stopped with the
        others on release, and found by its directory by recovery)."""
        self._vr.exports.append(export)
        await self._record("attach_exports", export_records(self._vr.exports))

    async def __aenter__(self) -> NbdTargetDisk:
        try:
            return await self._open()
        except BaseException as e:
            await self._cleanup(e)
            raise

    async def _open(self) -> NbdTargetDisk:
        vr, entry = self._vr, self._entry
        await self._record("engine", vr.recovery)
        dm = await vr.datamover()
        created, sparse = await vr.add_disk(entry, self._record, self._created)
        vr.attachments.append(created.id)
        await self._record("attachments", [{"vm_id": dm.id, "disk_id": d} for d in vr.attachments])
        self._attached = True
        async with vr.hotplug:
            await attach_disk(vr.client, dm.id, dm.name, created.id)
        self._device = await wait_device(
            vr.section.by_id_dir, created.id, vr.section.device_timeout, dm.name
        )
        self._export = await serve_writable(self._device, self._journal_export)
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
        self._target = NbdTargetDisk(info, sparse, self._export, DEFAULT_MAX_CONNECTIONS)
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
            await asyncio.to_thread(fsync_device, self._device)
        if self._attached and self._disk_id is not None:
            dm = await vr.datamover()
            async with vr.hotplug:
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
        self._finding = asyncio.Lock()  # disks at once look the DataMover up once
        self.hotplug = asyncio.Lock()  # one attach or detach on the DataMover at a time

    async def datamover(self) -> VmRef:
        async with self._finding:
            if self._datamover is None:
                self._datamover = await find_datamover(self.client, self.section)
        return self._datamover

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        self._record = record  # create_vm records the new VM with it (recovery deletes it)
        return _DiskViaDataMover(self, entry, record)
