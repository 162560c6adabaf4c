"""The snapshot + image-transfer flow (DESIGN §6, flow 2, LAN based) as a ``Source``.

::

    open():  GET vms/{vm}?all_content=true → OVF (VmInfo.config, format "ovf"), status and
             the guest-agent facts (consistency, ``require_quiesce``)
             POST vms/{vm}/snapshots (our own id, recorded first; description "Tessera <ckpt>",
             persist_memorystate=false) ──poll──▶ ok
             GET snapshots/{s}/disks → per disk its snapshot volume (image_id)
    read, disk by disk (``backup.TransferDisk``: a transfer is open only while its disk is
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

import asyncio
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t

from engine.core.errors import EngineError
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, VmInfo
from engine.util import failpoints
from plugins.ovirt.backup import (
    POLL_INTERVAL,
    READY_TIMEOUT,
    OvirtSourceBase,
    TransferDisk,
    new_transfer,
)
from plugins.ovirt.client import EngineClient
from plugins.ovirt.idempotent import Wanted, already_done

REMOVE_TIMEOUT: Final = 1800.0  # removing a snapshot of a running VM is a live merge
FULL_READ: Final = "snapshot flow reads fully"


class OvirtSnapshotError(EngineError):
    template = "VM {vm}: snapshot {snapshot}: {reason}"


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
        snapshot_id = str(uuid.uuid4())
        record("engine", self._config)
        record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})  # before it exists
        snapshot = t.Snapshot(
            id=snapshot_id,
            description=f"Tessera {new_checkpoint}",
            persist_memorystate=False,
            disk_attachments=[t.DiskAttachment(disk=t.Disk(id=d.id)) for d in disks],
        )

        def create(conn: sdk.Connection) -> Any:
            vms = conn.system_service().vms_service()
            return vms.vm_service(vm.id).snapshots_service().add(snapshot)

        created = await self.client.call(
            create, "create snapshot", obj=f"VM {vm.name}", idempotent=False
        )
        if created.id != snapshot_id:  # an engine that picks its own id
            snapshot_id = created.id
            record("snapshot", {"vm_id": vm.id, "snapshot_id": snapshot_id})
        reason = FULL_READ if parent_checkpoint is not None else None
        attributes = {"consistency": consistency, "snapshot": snapshot_id}
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
        session = SnapshotSession(self.client, info, snapshot_id, consistency)
        try:
            await wait_snapshot(self.client, vm.id, snapshot_id)
            volumes = await snapshot_volumes(self.client, vm.id, snapshot_id)
            transfers: list[str] = []

            def created(transfer_id: str) -> None:
                transfers.append(transfer_id)
                record("transfers", list(transfers))  # right after it exists

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
                        add=partial(add_snapshot_transfer, self.client, volume),
                        created=created,
                        what=f"snapshot {snapshot_id}: disk {dinfo.name} (volume {volume})",
                        vm=vm.name,
                        failpoint="ovirt.snapshot.transfer_finalize",
                    )
                )
        except BaseException:
            await session.close(success=False)
            raise
        return session


def _snapshot_service(conn: sdk.Connection, vm_id: str, snapshot_id: str) -> Any:
    vms = conn.system_service().vms_service()
    return vms.vm_service(vm_id).snapshots_service().snapshot_service(snapshot_id)


async def wait_snapshot(client: EngineClient, vm_id: str, snapshot_id: str) -> None:
    """Poll until the snapshot is ``ok``; a snapshot that vanished failed to be created."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT

    def status(conn: sdk.Connection) -> str | None:
        try:
            s = _snapshot_service(conn, vm_id, snapshot_id).get()
        except sdk.NotFoundError:
            return None
        return str(s.snapshot_status.value) if s.snapshot_status else "?"

    while (current := await client.call(status, "poll snapshot", obj=snapshot_id)) != "ok":
        if current is None:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="creation failed")
        if loop.time() > deadline:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason=f"still {current}")
        await asyncio.sleep(POLL_INTERVAL)


async def snapshot_volumes(client: EngineClient, vm_id: str, snapshot_id: str) -> dict[str, str]:
    """Disk id → the snapshot's volume id of that disk (``<snapshot id>`` of a transfer)."""

    def get(conn: sdk.Connection) -> dict[str, str]:
        disks = _snapshot_service(conn, vm_id, snapshot_id).disks_service().list()
        return {d.id: d.image_id for d in disks if d.image_id}

    return await client.call(get, "list snapshot disks", obj=f"snapshot {snapshot_id}")


async def add_snapshot_transfer(client: EngineClient, volume_id: str) -> Any:
    """Create the download transfer of one snapshot volume; return it as created (record its
    id, then ``wait_transfer``)."""

    def add(conn: sdk.Connection) -> Any:
        return (
            conn.system_service()
            .image_transfers_service()
            .add(
                new_transfer(
                    snapshot=t.DiskSnapshot(id=volume_id),
                    direction=t.ImageTransferDirection.DOWNLOAD,
                )
            )
        )

    return await client.call(
        add, "start image transfer", obj=f"disk snapshot {volume_id}", idempotent=False
    )


async def remove_snapshot(
    client: EngineClient, vm_id: str, snapshot_id: str, *, failpoint: str | None = None
) -> bool:
    """DELETE the snapshot (a merge) and poll until it is gone (404).

    A ``locked`` snapshot (still being created, or already being removed: the engine refuses
    a DELETE of either with 409) is waited for first; then one that is gone needs nothing.
    Returns False when it was gone without this call's DELETE (``idempotent.already_done``).
    ``failpoint`` (crash tests) is hit after the DELETE was sent (``.sent``) and once the
    snapshot is gone (``.done``)."""

    def status(conn: sdk.Connection) -> str | None:
        try:
            s = _snapshot_service(conn, vm_id, snapshot_id).get()
        except sdk.NotFoundError:
            return None
        return str(s.snapshot_status.value) if s.snapshot_status else "?"

    def remove(conn: sdk.Connection) -> bool:
        try:
            _snapshot_service(conn, vm_id, snapshot_id).remove()
        except sdk.Error as e:
            if already_done(e, Wanted.GONE):
                return False
            raise
        return True

    what = f"snapshot {snapshot_id}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REMOVE_TIMEOUT
    while (current := await client.call(status, "poll snapshot", obj=what)) == "locked":
        if loop.time() > deadline:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="still locked")
        await asyncio.sleep(POLL_INTERVAL)
    if current is None:
        return False
    acted = await client.call(remove, "remove snapshot", obj=what)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    while await client.call(status, "poll snapshot removal", obj=what) is not None:
        if loop.time() > deadline:
            raise OvirtSnapshotError(vm=vm_id, snapshot=snapshot_id, reason="never removed")
        await asyncio.sleep(POLL_INTERVAL)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted
