"""The snapshot + image-transfer flow (DESIGN §6, flow 2, LAN based) as a ``Source``.

::

    open():  GET vms/{vm}?all_content=true → OVF (VmInfo.config, format "ovf"), status and
             the guest-agent facts (consistency, ``require_quiesce``)
             POST vms/{vm}/snapshots (our own id, recorded first; description "Tessera <ckpt>",
             persist_memorystate=false) ──poll──▶ ok
             GET snapshots/{s}/disks → per disk its snapshot volume (image_id)
    read, disk by disk (``transfers.TransferDisk``: a transfer is open only while its disk is
             read, so none sits idle until the engine cancels it):
             first use: POST imagetransfers (download, raw, snapshot=<volume id>,
                        inactivity_timeout, timeout_policy=cancel) ──poll──▶ transferring;
                        ImageioDisk.connect(transfer_url, proxy_url, ca=, keep_alive=extend)
             extents "zero", ranged GETs per reader: every run is a full read (no checkpoint;
             the store's dedup keeps unchanged data cheap)
             release (the job read the disk): close, finalize ──poll──▶ finished_success
    close(): finalize any transfer still open, DELETE the snapshot and poll until it is gone (404),
             on success and on failure alike (a snapshot still ``locked``, being created or
             already being removed, is waited for first: the engine refuses its DELETE;
             failpoints ``ovirt.snapshot.transfer_finalize.*``, ``ovirt.snapshot.remove.*``)

Consistency: the snapshot API has no quiesce flag; vdsm freezes the guest through its agent
and silently takes a crash-consistent snapshot without one (API-NOTES § 7.1). The only hint
is what the agent reports: ``guest_operating_system`` / ``fqdn`` of a running VM. The result
is recorded per disk (attribute ``consistency``: ``application`` when an agent answered,
``crash`` without one, ``offline`` for a VM that is not running).

The transfer names only ``<snapshot id=VOLUME>`` (as SDK-EX ``download_disk_snapshot.py``):
the engine finds the disk from the volume (``GetDiskIdBySnapshotId``).
"""

from collections.abc import Sequence
from functools import partial

import ovirtsdk4.types as t
import structlog

from engine.core.errors import EngineError
from engine.sources.types import ResourceRecorder, SourceDisk, VmInfo
from plugins.ovirt.base import OvirtSourceBase
from plugins.ovirt.client import EngineClient
from plugins.ovirt.snapshots import (
    FULL_READ,
    OvirtSnapshotError,
    create_snapshot,
    remove_snapshot,
    snapshot_volumes,
    wait_snapshot,
)
from plugins.ovirt.transfers import TransferDisk, add_transfer

log = structlog.get_logger("tessera.ovirt")


class SnapshotSession:
    """The opened snapshot; ``checkpoint`` is always None (nothing to continue from)."""

    def __init__(self, client: EngineClient, vm: VmInfo, snapshot_id: str, consistency: str):
        self.client = client
        self.vm = vm
        self.snapshot_id = snapshot_id
        self.consistency = consistency  # "application" | "crash" | "offline"
        self._disks: list[TransferDisk] = []

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self._disks

    @property
    def checkpoint(self) -> str | None:
        return None

    async def close(self, success: bool) -> None:
        """Finalize the transfers, then remove the snapshot and wait until it is gone."""
        errors: list[str] = []
        for disk in self._disks:  # those the job did not release (it failed on the way)
            try:
                await disk.release()
            except EngineError as e:
                errors.append(str(e))
        try:
            await remove_snapshot(
                self.client, self.vm.vm_id, self.snapshot_id, failpoint="ovirt.snapshot.remove"
            )
        except EngineError as e:
            errors.append(str(e))
        if errors:
            raise OvirtSnapshotError(
                vm=self.vm.name, snapshot=self.snapshot_id, reason="; ".join(errors)
            )


class SnapshotImageioSource(OvirtSourceBase):
    """One oVirt VM backed up through a VM snapshot and image transfers of its volumes."""

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> SnapshotSession:
        vm = self.vm
        disks, skipped = self.readable_disks()
        ovf, consistency = await self.facts()
        await record("engine", self._config)
        snapshot_id = await create_snapshot(self.client, vm, disks, new_checkpoint, record)
        reason = FULL_READ if parent_checkpoint is not None else None
        attributes = {"consistency": consistency, "snapshot": snapshot_id}
        info = self.vm_info(disks, ovf, skipped, attributes)
        session = SnapshotSession(self.client, info, snapshot_id, consistency)
        try:
            await wait_snapshot(self.client, vm.id, snapshot_id)
            volumes = await snapshot_volumes(self.client, vm.id, snapshot_id)
            transfers: list[str] = []

            async def created(transfer_id: str) -> None:
                transfers.append(transfer_id)
                await record("transfers", list(transfers))  # right after it exists

            for dinfo in info.disks:
                volume = volumes.get(dinfo.disk_id)
                if volume is None:
                    raise OvirtSnapshotError(
                        vm=vm.name, snapshot=snapshot_id, reason=f"disk {dinfo.name} missing"
                    )
                session._disks.append(
                    TransferDisk(
                        self.client,
                        dinfo,
                        None,
                        reason,
                        add=partial(
                            add_transfer,
                            self.client,
                            f"disk snapshot {volume}",
                            snapshot=t.DiskSnapshot(id=volume),
                            direction=t.ImageTransferDirection.DOWNLOAD,
                        ),
                        created=created,
                        what=f"VM {vm.name}: snapshot {snapshot_id}: disk {dinfo.name} "
                        f"(volume {volume})",
                        failpoint="ovirt.snapshot.transfer_finalize",
                    )
                )
        except BaseException as e:
            try:
                await session.close(success=False)
            except EngineError as cleanup:  # keep the first error; say what is left
                log.warning("snapshot cleanup failed", vm=vm.name, error=str(cleanup))
                e.add_note(f"cleanup: {cleanup}")
            raise
        return session
