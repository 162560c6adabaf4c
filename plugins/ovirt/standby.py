"""The oVirt side of a cold standby (``engine.standby``): the standby VM and its disks.

::

    standby_refresh(engine, manifest, ovf, standby)   # the Hypervisor's → OvirtStandby
      check(state):  GET the standby VM (gone → full run); not down → refuse (it is in use);
                     each recorded disk attached to it and ok (gone, detached → full run;
                     illegal — an upload that was cancelled — → full run; locked → refuse);
                     a thin disk on block storage whose volume (``actual_size``) is smaller
                     than the new snapshot's ``volumes.initial_size`` → full run (the
                     engine extends no volume during an upload)
      refresh_target(entry, disk):  POST imagetransfers (upload, raw, <disk id> = the
                     existing standby disk; allowed because the VM is down, API-NOTES § 8.2)
                     → id recorded (``standby_transfers``) → transferring → ImageioDisk,
                     ticket extended → TargetDisk(fresh=False): ranged PUTs / zeroes only
                     for the slots the job writes
          exit ok:   close, finalize, wait finished_success
          failure:   transferring: close and *finalize* — the disk stays legal holding a
                     partial refresh, which the job's state marks dirty (the next refresh
                     rewrites every slot); otherwise (never reached transferring, or the
                     finalize failed): cancel, which leaves the disk illegal on a real
                     engine (API-NOTES § 5.2), so the next refresh's check asks a full run
      full(manifest, old):  ``restore.vm_restore`` as ``<vm><suffix>`` in the policy's
                     cluster and storage domain, its pre-flight first (``preflight``: a
                     missing cluster or domain, one without room, the name held by a VM
                     other than ``old``'s fail before any disk is made or the old standby
                     discarded); the VM is created down with the disks attached
      discard(state):  delete the old standby VM (keeping its disks), then its recorded disks

Why finalize and not cancel on failure: cancelling an upload makes the disk illegal, and an
illegal disk takes no new transfer — the only way back would be recreating the whole
standby. Finalizing keeps the copy repairable in place; it is never started while dirty
because the job's state says so (and the next refresh rewrites it).

Journal keys: ``engine`` (recovery credentials), ``standby_transfers`` (refresh uploads):
``recover`` finalizes (else cancels) what a killed refresh left; a killed full run is
``VmRestore``'s (``restore_disks``, ``restore_vm``); ``recovery.recover`` handles both.

Raised: ``OvirtStandbyError`` naming the VM (and disk) when the standby must not be touched
or a transfer fails; ``EngineError``s of ``client``; ``ImageioError``s from writers.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import ovirtsdk4.types as t
import structlog

from engine.config.models import EngineSection
from engine.config.policy import Standby
from engine.core.errors import EngineError
from engine.sources.types import DiskInfo, ResourceRecorder, TargetDisk
from engine.standby.job import CreatedStandby, FullStandby, StandbyTargets
from engine.standby.state import StandbyDisk, StandbyState
from engine.store.manifest import DiskEntry, Manifest
from engine.util import failpoints
from plugins.ovirt import inventory, volumes
from plugins.ovirt.client import EngineClient, EngineConfig, EngineNotFound
from plugins.ovirt.disks import delete_disk, delete_vm
from plugins.ovirt.imageio import ImageioDisk
from plugins.ovirt.restore import RestoreOptions, VmRestore, vm_restore
from plugins.ovirt.transfers import (
    UploadTarget,
    add_transfer,
    cancel_transfer,
    finalize_transfer,
    open_image,
)

log = structlog.get_logger("tessera.ovirt.standby")

CLEANUP_TIMEOUT: Final = 120.0  # ending a failed refresh's transfer must not hang the job


class OvirtStandbyError(EngineError):
    template = "standby {standby} of VM {vm}: {reason}"


def _recovery(engine: EngineSection) -> dict[str, Any]:
    return EngineConfig.from_section(engine).record()


class _RefreshUpload:
    """``OvirtStandby.refresh_target``: an upload into one existing standby disk."""

    def __init__(
        self, sb: "OvirtStandby", entry: DiskEntry, disk: StandbyDisk, record: ResourceRecorder
    ) -> None:
        self._sb = sb
        self._entry = entry
        self._disk = disk
        self._record = record
        self._transfer_id: str | None = None
        self._image: ImageioDisk | None = None

    async def _transfer_created(self, transfer_id: str) -> None:
        self._transfer_id = transfer_id
        self._sb.transfer_ids.append(transfer_id)
        await self._record(
            "standby_transfers", list(self._sb.transfer_ids)
        )  # right after it exists

    def _error(self, reason: str) -> OvirtStandbyError:
        return self._sb.error(f"disk {self._entry.name} ({self._disk.standby_disk_id}): {reason}")

    async def __aenter__(self) -> UploadTarget:
        try:
            return await self._open()
        except BaseException as e:
            await self._end(e)
            raise

    async def _open(self) -> UploadTarget:
        sb, disk_id = self._sb, self._disk.standby_disk_id
        await self._record("engine", sb.recovery)

        self._image = await open_image(
            sb.client,
            partial(
                add_transfer,  # raw guest data; the engine keeps the format
                sb.client,
                f"standby disk {disk_id}",
                disk=t.Disk(id=disk_id),
                direction=t.ImageTransferDirection.UPLOAD,
            ),
            self._transfer_created,
            f"VM {sb.name}: upload to standby disk {disk_id}",
        )
        failpoints.hit("ovirt.standby.transferring")
        info = DiskInfo(disk_id, self._entry.name, self._disk.size, dict(self._entry.attributes))
        return UploadTarget(info, False, self._image)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            await self._end(exc)
            return
        assert self._image is not None
        assert self._transfer_id is not None
        try:
            await self._image.close()
            await finalize_transfer(
                self._sb.client,
                self._transfer_id,
                what=f"VM {self._sb.name}: upload to standby disk {self._disk.standby_disk_id}",
            )
        except BaseException as e:
            self._image = None  # closed (or unusable): end the transfer with a cancel
            await self._end(e)
            raise

    async def _end(self, error: BaseException) -> None:
        """End a failed refresh's transfer (module docstring); failures become notes."""
        transfer_id, image = self._transfer_id, self._image
        if transfer_id is None:
            return
        client = self._sb.client
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                if image is not None:
                    await image.close()
                    try:
                        await finalize_transfer(client, transfer_id)
                    except EngineError as e:
                        log.warning("finalize after a failed refresh failed", error=str(e))
                    else:
                        error.add_note(
                            f"standby disk {self._disk.standby_disk_id}: partial refresh "
                            f"finalized (transfer {transfer_id}); the disk is marked dirty"
                        )
                        return
                await cancel_transfer(client, transfer_id)
                error.add_note(
                    f"standby disk {self._disk.standby_disk_id}: transfer {transfer_id} cancelled"
                )
        except Exception as e:  # noqa: BLE001 - the refresh's own error is the one to raise
            log.warning("standby refresh cleanup failed", transfer=transfer_id, error=str(e))
            error.add_note(f"ending transfer {transfer_id} failed: {e}")


@dataclass
class _Full:
    """``engine.standby.job.FullStandby`` over a ``VmRestore``."""

    vr: VmRestore

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        return self.vr.make_target(entry, record)

    async def create(self) -> CreatedStandby:
        vm = await self.vr.create_vm()
        return CreatedStandby(vm.id, vm.name, {e.disk_id: d for e, d in self.vr.disks})


class OvirtStandby:
    """``engine.standby.job.StandbyTargets`` on one oVirt engine (module docstring)."""

    plugin = "ovirt"

    def __init__(
        self,
        client: EngineClient,
        engine: EngineSection,
        manifest: Manifest,
        ovf: str | None,
        standby: Standby,
    ) -> None:
        self.client = client
        self.engine = engine
        self.ovf = ovf  # the stored VM configuration of ``manifest``
        self.manifest = manifest
        self.standby = standby
        self.name = f"{manifest.vm_name}{standby.name_suffix}"
        self.recovery = _recovery(engine)
        self.transfer_ids: list[str] = []
        self._domains: dict[str, inventory.StorageDomainRef] | None = None  # listed once

    def error(self, reason: str) -> OvirtStandbyError:
        return OvirtStandbyError(standby=self.name, vm=self.manifest.vm_name, reason=reason)

    async def check(self, state: StandbyState, manifest: Manifest) -> str | None:
        try:
            vm = await inventory.vm(self.client, state.standby_vm_id)
        except EngineNotFound:
            return f"standby VM {state.standby_vm_name} ({state.standby_vm_id}) was deleted"
        if vm.status != "down":
            raise self.error(
                f"standby VM {vm.name} ({vm.id}) is {vm.status}, not down: not refreshed "
                "(it is in use, e.g. after a failover; stop or delete it to resume refreshes)"
            )
        attached = {d.id: d for d in vm.disks}
        entries = {e.disk_id: e for e in manifest.disks}
        for source_id, disk in state.disks.items():
            what = f"standby disk {disk.name or source_id} ({disk.standby_disk_id})"
            found = attached.get(disk.standby_disk_id)
            if found is None:
                return f"{what} is no longer attached to VM {vm.name} (deleted or detached)"
            if found.status == "illegal":
                return f"{what} is illegal (an upload into it was cancelled)"
            if found.status not in (None, "ok"):
                raise self.error(f"{what} is {found.status}; try again later")
            if found.provisioned_size < disk.size:
                return f"{what} has {found.provisioned_size} bytes, fewer than {disk.size}"
            entry = entries.get(source_id)
            if entry is not None and (reason := await self._too_small(found, entry)):
                return f"{what} {reason}"
        return None

    async def _too_small(self, found: inventory.DiskRef, entry: DiskEntry) -> str | None:
        """Why a thin volume on block storage cannot take ``entry``'s data (the engine
        does not extend it during an upload, ``volumes``), or None."""
        if found.format != "cow" or found.actual_size is None:
            return None
        if found.actual_size >= found.provisioned_size:
            return None  # preallocated: the volume holds the whole disk
        if self._domains is None:
            self._domains = {d.id: d for d in await inventory.storage_domains(self.client)}
        sd = self._domains.get(found.storage_domain_id or "")
        if sd is None or not sd.block:
            return None  # file storage grows with the upload
        needed = await volumes.initial_size(entry.size, entry.data_bytes)
        if needed <= found.actual_size:
            return None
        return (
            f"is a {found.actual_size}-byte volume on block domain {sd.name}; the snapshot's "
            f"data needs up to {needed} and an upload cannot extend it"
        )

    def refresh_target(
        self, entry: DiskEntry, disk: StandbyDisk, record: ResourceRecorder
    ) -> _RefreshUpload:
        return _RefreshUpload(self, entry, disk, record)

    @asynccontextmanager
    async def full(self, manifest: Manifest, old: StandbyState | None) -> AsyncIterator[_Full]:
        """A full run as a ``VmRestore``, whose pre-flight checks the policy's cluster and
        storage domain and the name, which only ``old``'s VM may hold (it is discarded
        before the new one is created)."""
        options = RestoreOptions(
            name=self.name,
            cluster=self.standby.cluster,
            storage_domain=self.standby.storage_domain,
            replaces=old.standby_vm_id if old is not None else None,
        )
        if manifest.snapshot_id != self.manifest.snapshot_id:
            raise self.error(
                f"a full run of snapshot {manifest.snapshot_id} was asked for standby "
                f"targets of snapshot {self.manifest.snapshot_id}"
            )
        async with vm_restore(self.engine, manifest, self.ovf, options) as vr:
            yield _Full(vr)

    async def discard(self, state: StandbyState) -> list[str]:
        """Delete the old standby VM (its status was checked: down, or gone) and its disks.
        A disk that cannot be deleted is reported, not raised: the new standby matters more
        than the old one's leftovers."""
        done = []
        await delete_vm(self.client, state.standby_vm_id)  # keeps the disks (detach_only)
        done.append(f"deleted old standby VM {state.standby_vm_name} ({state.standby_vm_id})")
        for disk in state.disks.values():
            try:
                await delete_disk(self.client, disk.standby_disk_id)
                done.append(f"deleted old standby disk {disk.name} ({disk.standby_disk_id})")
            except EngineError as e:
                log.warning("old standby disk left", disk=disk.standby_disk_id, error=str(e))
                done.append(f"could not delete old standby disk {disk.standby_disk_id}: {e}")
        return done


def _config(engine: EngineSection) -> EngineConfig:
    return EngineConfig.from_section(engine)


@asynccontextmanager
async def standby_refresh(
    engine: EngineSection, manifest: Manifest, ovf: str | None, standby: Standby
) -> AsyncIterator[OvirtStandby]:
    """The plugin factory: an ``OvirtStandby`` with its own client (closed on exit)."""
    async with EngineClient(_config(engine)) as client:
        yield OvirtStandby(client, engine, manifest, ovf, standby)


if TYPE_CHECKING:  # mypy proves the classes fit the job's protocols

    def _fits(sb: OvirtStandby, full: _Full) -> tuple[StandbyTargets, FullStandby]:
        return sb, full
