"""The incremental-backup-API flow (DESIGN §6, flow 1) as a ``Source``.

::

    open():  POST vms/{vm}/backups  (our own backup id, recorded first; from_checkpoint_id
             for an incremental)  ──poll──▶ ready  (tolerates ``starting`` of hybrid mode)
             GET backups/{b}/disks → backup_mode per disk (full ⇒ full read, reason kept)
             per disk: POST imagetransfers (download, raw, backup=b) ──poll──▶ transferring
                       ImageioDisk.connect(transfer_url, proxy_url)
    read:    extents "zero" (and "dirty" for incremental disks), ranged GETs per reader
    close(): finalize every transfer, finalize the backup, poll until succeeded|failed
             (also after a failure: finalizing is the cleanup)

Every engine object is recorded in the job journal before (backup: its id is ours) or right
after (transfers) it is created, so ``recover`` can finalize what a killed process left.
"""

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t

from engine.core.errors import EngineError
from engine.core.extent import Extent
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, VmInfo
from plugins.ovirt.client import EngineClient
from plugins.ovirt.imageio import ImageioDisk, ImageioReader
from plugins.ovirt.inventory import VmRef

POLL_INTERVAL: Final = 0.25  # seconds between phase polls: engine phases move in seconds
READY_TIMEOUT: Final = 600.0  # a live backup with scratch disks can take minutes to start
FINALIZE_TIMEOUT: Final = 600.0  # hybrid finalize removes a snapshot (a block commit)


class OvirtBackupError(EngineError):
    template = "VM {vm}: backup {backup}: {reason}"


@dataclass
class _Disk:
    info: DiskInfo
    checkpoint_parent: str | None
    fallback_reason: str | None
    image: ImageioDisk
    transfer_id: str

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.image.extents("zero", offset, length)

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await self.image.extents("dirty", offset, length)

    async def open_reader(self) -> ImageioReader:
        return await self.image.open_reader()


class BackupApiSession:
    def __init__(self, client: EngineClient, vm: VmInfo, backup_id: str):
        self.client = client
        self.vm = vm
        self.backup_id = backup_id
        self.to_checkpoint: str | None = None
        self._disks: list[_Disk] = []

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self._disks

    @property
    def checkpoint(self) -> str | None:
        return self.to_checkpoint

    @property
    def consistency(self) -> str | None:
        return None  # the backup API does not report whether the guest froze

    async def close(self, success: bool) -> None:
        errors: list[str] = []
        for disk in self._disks:
            try:
                await disk.image.close()
                await finalize_transfer(self.client, disk.transfer_id)
            except EngineError as e:
                errors.append(str(e))
        try:
            await finalize_backup(self.client, self.vm.vm_id, self.backup_id)
        except EngineError as e:
            errors.append(str(e))
        if errors:
            raise OvirtBackupError(vm=self.vm.name, backup=self.backup_id, reason="; ".join(errors))


class OvirtVmSource:
    """One oVirt VM backed up through the incremental-backup API."""

    plugin = "ovirt"

    def __init__(self, client: EngineClient, vm: VmRef, config: dict[str, Any]):
        self.client = client
        self.vm = vm
        self.vm_id = vm.id
        self.vm_name = vm.name
        self._config = config  # engine url/user/password_file/ca_file, for recovery

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> "BackupApiSession":
        vm = self.vm
        disks = [d for d in vm.disks if d.active]
        backup_id = str(uuid.uuid4())
        ovf = await self._ovf()
        record("engine", self._config)
        record("backup", {"vm_id": vm.id, "backup_id": backup_id})  # before it exists
        backup = t.Backup(
            id=backup_id,
            disks=[t.Disk(id=d.id) for d in disks],
            from_checkpoint_id=parent_checkpoint,
            description=f"Tessera {new_checkpoint}",
        )

        def start(conn: sdk.Connection) -> Any:
            return (
                conn.system_service().vms_service().vm_service(vm.id).backups_service().add(backup)
            )

        await self.client.call(start, "start backup", obj=f"VM {vm.name}", idempotent=False)
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
                        "backup": "incremental" if d.incremental else "none",
                    },
                )
                for d in disks
            ),
            config=ovf,
            config_format="ovf",
        )
        session = BackupApiSession(self.client, info, backup_id)
        try:
            ready = await wait_backup(self.client, vm.id, backup_id, {"ready"})
            session.to_checkpoint = ready.to_checkpoint_id
            modes = await backup_modes(self.client, vm.id, backup_id)
            transfers: list[str] = []
            for dinfo in info.disks:
                mode = modes.get(dinfo.disk_id, "full")
                incremental = parent_checkpoint is not None and mode == "incremental"
                reason = None
                if parent_checkpoint is not None and not incremental:
                    reason = f"the engine reported backup_mode={mode} for this disk: full read"
                transfer = await start_transfer(self.client, dinfo.disk_id, backup_id)
                transfers.append(transfer.id)
                record("transfers", list(transfers))
                image = await ImageioDisk.connect(transfer.transfer_url, transfer.proxy_url)
                session._disks.append(
                    _Disk(
                        dinfo,
                        parent_checkpoint if incremental else None,
                        reason,
                        image,
                        transfer.id,
                    )
                )
        except BaseException:
            await session.close(success=False)
            raise
        return session

    async def _ovf(self) -> bytes | None:
        """The VM's OVF (``all_content``), saved with the snapshot for a restore as a new VM."""

        def get(conn: sdk.Connection) -> Any:
            return conn.system_service().vms_service().vm_service(self.vm.id).get(all_content=True)

        found = await self.client.call(get, "read VM configuration", obj=f"VM {self.vm.name}")
        config = found.initialization.configuration if found.initialization else None
        return config.data.encode() if config is not None and config.data else None


async def wait_backup(client: EngineClient, vm_id: str, backup_id: str, phases: set[str]) -> Any:
    """Poll the backup until its phase is one of ``phases``; FAILED raises with the reason."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT

    def get(conn: sdk.Connection) -> Any:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        return vm.backups_service().backup_service(backup_id).get()

    while True:
        backup = await client.call(get, "poll backup", obj=f"backup {backup_id}")
        phase = str(backup.phase.value) if backup.phase is not None else "?"
        if phase in phases:
            return backup
        if phase == "failed":
            raise OvirtBackupError(vm=vm_id, backup=backup_id, reason="the engine reports FAILED")
        if loop.time() > deadline:
            raise OvirtBackupError(vm=vm_id, backup=backup_id, reason=f"still {phase}")
        await asyncio.sleep(POLL_INTERVAL)


async def backup_modes(client: EngineClient, vm_id: str, backup_id: str) -> dict[str, str]:
    def get(conn: sdk.Connection) -> dict[str, str]:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        disks = vm.backups_service().backup_service(backup_id).disks_service().list()
        return {d.id: str(d.backup_mode.value) if d.backup_mode else "full" for d in disks}

    return await client.call(get, "list backup disks", obj=f"backup {backup_id}")


async def start_transfer(client: EngineClient, disk_id: str, backup_id: str) -> Any:
    def add(conn: sdk.Connection) -> Any:
        return (
            conn.system_service()
            .image_transfers_service()
            .add(
                t.ImageTransfer(
                    disk=t.Disk(id=disk_id),
                    backup=t.Backup(id=backup_id),
                    direction=t.ImageTransferDirection.DOWNLOAD,
                    format=t.DiskFormat.RAW,
                )
            )
        )

    transfer = await client.call(
        add, "start image transfer", obj=f"disk {disk_id}", idempotent=False
    )
    return await wait_transfer(client, transfer, f"backup {backup_id}")


async def wait_transfer(client: EngineClient, transfer: Any, what: str) -> Any:
    """Poll a new transfer until ``transferring`` (it then has its URLs) and return it;
    ``paused_system``/``finished_failure`` or a timeout raise, naming ``what`` it reads."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    transfer_id = transfer.id

    def get(conn: sdk.Connection) -> Any:
        return (
            conn.system_service()
            .image_transfers_service()
            .image_transfer_service(transfer_id)
            .get()
        )

    while transfer.phase != t.ImageTransferPhase.TRANSFERRING:
        if transfer.phase in (
            t.ImageTransferPhase.PAUSED_SYSTEM,
            t.ImageTransferPhase.FINISHED_FAILURE,
        ):
            raise OvirtBackupError(
                vm="?", backup=what, reason=f"transfer {transfer_id} is {transfer.phase}"
            )
        if loop.time() > deadline:
            raise OvirtBackupError(
                vm="?", backup=what, reason=f"transfer {transfer_id} never started"
            )
        await asyncio.sleep(POLL_INTERVAL)
        transfer = await client.call(get, "poll image transfer", obj=f"transfer {transfer_id}")
    return transfer


async def finalize_transfer(client: EngineClient, transfer_id: str) -> None:
    """Finalize a transfer and wait until the engine says it finished (the engine refuses to
    finalize a backup while any of its transfers is still finalizing)."""

    def service(conn: sdk.Connection) -> Any:
        return conn.system_service().image_transfers_service().image_transfer_service(transfer_id)

    def finalize(conn: sdk.Connection) -> bool:
        try:
            service(conn).finalize()
        except sdk.NotFoundError:
            return False  # already gone: finalized earlier, or cleaned up by the engine
        return True

    def phase(conn: sdk.Connection) -> str | None:
        try:
            return str(service(conn).get().phase.value)
        except sdk.NotFoundError:
            return None

    what = f"transfer {transfer_id}"
    if not await client.call(finalize, "finalize image transfer", obj=what):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINALIZE_TIMEOUT
    while (current := await client.call(phase, "poll image transfer", obj=what)) is not None:
        if current.startswith("finished"):
            if current != "finished_success":
                raise OvirtBackupError(vm="?", backup="?", reason=f"{what} ended {current}")
            return
        if loop.time() > deadline:
            raise OvirtBackupError(vm="?", backup="?", reason=f"{what} still {current}")
        await asyncio.sleep(POLL_INTERVAL)


async def finalize_backup(client: EngineClient, vm_id: str, backup_id: str) -> None:
    def finalize(conn: sdk.Connection) -> bool:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        try:
            vm.backups_service().backup_service(backup_id).finalize()
        except sdk.NotFoundError:
            return False  # never created, or purged: nothing to finalize
        return True

    if await client.call(finalize, "finalize backup", obj=f"backup {backup_id}"):
        await wait_backup(client, vm_id, backup_id, {"succeeded", "failed"})


async def recover(resources: dict[str, Any], committed: bool) -> list[str]:
    """Finalize the transfers, the backup and remove the snapshot a killed job left on the
    engine (either flow: ``backup`` is flow 1's, ``snapshot`` flow 2's); for a killed restore
    into the engine (``restore``), cancel its uploads and delete the disks it created."""
    from plugins.ovirt.client import EngineConfig  # noqa: PLC0415 - only recovery needs it
    from plugins.ovirt.snapshot import remove_snapshot  # noqa: PLC0415 - imports this module

    backup = resources.get("backup")
    snapshot = resources.get("snapshot")
    engine = resources.get("engine")
    restored = resources.get("restore_disks")
    if not (backup or snapshot or restored) or not engine:
        return []
    config = EngineConfig(
        url=engine["url"],
        username=engine["username"],
        password_file=Path(engine["password_file"]),
        ca_file=Path(engine["ca_file"]) if engine.get("ca_file") else None,
    )
    done = []
    async with EngineClient(config) as client:
        for transfer_id in resources.get("transfers", []):
            await finalize_transfer(client, transfer_id)
            done.append(f"finalized image transfer {transfer_id}")
        if backup:
            await finalize_backup(client, backup["vm_id"], backup["backup_id"])
            done.append(f"finalized backup {backup['backup_id']} of VM {backup['vm_id']}")
        if snapshot:
            await remove_snapshot(client, snapshot["vm_id"], snapshot["snapshot_id"])
            done.append(f"removed snapshot {snapshot['snapshot_id']} of VM {snapshot['vm_id']}")
        if restored:  # a killed restore into the engine: no disk of it is worth keeping
            from plugins.ovirt.restore import cancel_transfer, delete_disk  # noqa: PLC0415

            for transfer_id in resources.get("restore_transfers", []):
                await cancel_transfer(client, transfer_id)
                done.append(f"cancelled upload transfer {transfer_id}")
            for disk_id in restored:
                await delete_disk(client, disk_id)
                done.append(f"deleted restored disk {disk_id}")
    return done
