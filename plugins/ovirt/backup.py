"""The incremental-backup-API flow (DESIGN §6, flow 1) as a ``Source``.

::

    open():  POST vms/{vm}/backups  (our own backup id, recorded first; from_checkpoint_id
             for an incremental)  ──poll──▶ ready  (hybrid mode: ``starting`` while the
             engine takes its snapshot; the backup then names it in ``<snapshot id>``)
             GET backups/{b}/disks → backup_mode per disk (full ⇒ full read, reason kept)
    read, disk by disk (``transfers.TransferDisk``: a transfer is open only while its disk is
             read):
             first use: POST imagetransfers (download, raw, backup=b, inactivity_timeout,
                        timeout_policy=cancel) ──poll──▶ transferring
                        ImageioDisk.connect(transfer_url, proxy_url, ca=, keep_alive=extend)
             extents "zero" (and "dirty" for incremental disks), ranged GETs per reader
             release (the job read the disk): close, finalize ──poll──▶ finished_success
    close(): finalize any transfer still open, finalize the backup, poll until
             succeeded|failed
             (also after a failure: finalizing is the cleanup; hybrid mode stays
             ``finalizing`` while the engine removes its snapshot); a hybrid backup's snapshot
             still there afterwards (event 10813) is reported as a leftover

Checkpoints (``checkpoints``): an incremental whose parent checkpoint the engine no longer
has (or has ``invalid``) starts as a full backup, every disk's ``fallback`` saying why; after
a successful backup Tessera's checkpoints older than the new one, except
``keep_checkpoints``, are deleted oldest first (a failure there is logged, not raised: the
backup itself is complete).

Failures (API-NOTES § 4.8): a backup that goes FAILED raises ``backups.OvirtBackupError``
quoting the engine's last event about it (looked up by the backup id, as SDK-EX
``backup_vm.py`` does); a transfer in any phase but initializing/resuming/transferring
(paused_*, cancelled_*, finalizing_failure, finished_*: the engine's inactivity monitor, a
lost ticket, an administrator) is cancelled at once, then raises ``OvirtTransferError`` naming
the disk, the phase, the transfer and the engine's event (``transfers``); a finalize that ends
anywhere but ``finished_success`` raises at once the same way; either way ``close`` then
finalizes what is still open. A disk the
engine serves with ``backup_mode=full`` in an incremental backup (e.g. its bitmap is gone) is
read in full, the reason recorded in its ``fallback`` attribute. With ``require_quiesce`` a
running VM whose guest agent reports nothing is refused before anything is created.

Every engine object is recorded in the job journal before (backup: its id is ours) or right
after (transfers) it is created, so ``recovery.recover`` can finalize what a killed process
left.
Finalizing is idempotent (``idempotent``): a transfer the engine already finalized (409
``Phase is finished_success``) or a backup it already finalized (400 ``already in
'succeeded' phase``) is done, so a process killed anywhere in ``close()`` (failpoints
``ovirt.backup.transfer_finalize.{sent,done}``, ``ovirt.backup.finalize.{sent,done}``) is
recovered, and a second recovery changes nothing.
"""

import uuid
from collections.abc import Sequence
from functools import partial

import ovirtsdk4.types as t
import structlog

from engine.core.errors import EngineError
from engine.sources.types import ResourceRecorder, SourceDisk, VmInfo
from plugins.ovirt import checkpoints
from plugins.ovirt.backups import (
    OvirtBackupError,
    backup_modes,
    check_snapshot_removed,
    finalize_backup,
    start_backup,
    wait_backup,
)
from plugins.ovirt.base import OvirtSourceBase
from plugins.ovirt.client import EngineClient
from plugins.ovirt.transfers import TransferDisk, add_transfer

log = structlog.get_logger("tessera.ovirt")


class BackupApiSession:
    def __init__(
        self,
        client: EngineClient,
        vm: VmInfo,
        backup_id: str,
        keep_checkpoints: Sequence[str] = (),
    ):
        self.client = client
        self.vm = vm
        self.backup_id = backup_id
        self.keep_checkpoints = frozenset(keep_checkpoints)
        self.dropped_checkpoints: list[str] = []
        self.to_checkpoint: str | None = None
        self.hybrid_snapshot: str | None = None  # the engine's snapshot of a hybrid backup
        self._disks: list[TransferDisk] = []

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
        for disk in self._disks:  # those the job did not release (it failed on the way)
            try:
                await disk.release()
            except EngineError as e:
                errors.append(str(e))
        try:
            await finalize_backup(
                self.client, self.vm.vm_id, self.backup_id, failpoint="ovirt.backup.finalize"
            )
            if self.hybrid_snapshot is not None:
                await check_snapshot_removed(
                    self.client, self.vm.vm_id, self.vm.name, self.hybrid_snapshot
                )
        except EngineError as e:
            errors.append(str(e))
        if errors:
            raise OvirtBackupError(vm=self.vm.name, backup=self.backup_id, reason="; ".join(errors))
        if success and self.to_checkpoint is not None:
            try:
                self.dropped_checkpoints = await checkpoints.drop_stale(
                    self.client,
                    self.vm.vm_id,
                    self.vm.name,
                    self.to_checkpoint,
                    self.keep_checkpoints,
                )
            except EngineError as e:
                log.warning("cannot delete stale checkpoints", vm=self.vm.name, error=str(e))


class OvirtVmSource(OvirtSourceBase):
    """One oVirt VM backed up through the incremental-backup API."""

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> "BackupApiSession":
        vm = self.vm
        gone = None  # why the parent checkpoint cannot be used
        if parent_checkpoint is not None:
            gone = await checkpoints.problem(self.client, vm.id, parent_checkpoint)
        from_checkpoint = None if gone else parent_checkpoint
        args = (parent_checkpoint, keep_checkpoints, new_checkpoint, record)
        try:
            return await self._start(from_checkpoint, gone, *args)
        except OvirtBackupError as e:
            if from_checkpoint is None:
                raise
            # A failed checkpoint redefine (after a VM restart) makes the engine drop the
            # VM's whole chain and fail the backup (event 10791, API-NOTES § 4.8). The
            # chain is gone for good: read every disk in full now, in this run.
            lost = await checkpoints.problem(self.client, vm.id, from_checkpoint)
            if lost is None:
                raise
            reason = f"the engine dropped the checkpoint chain ({e.fields['reason']}); {lost}"
            log.warning("checkpoint chain lost: full backup", vm=vm.name, reason=reason)
            return await self._start(None, reason, *args)

    async def _start(
        self,
        from_checkpoint: str | None,
        gone: str | None,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        record: ResourceRecorder,
    ) -> "BackupApiSession":
        """One backup on the engine, from ``from_checkpoint`` (None: full, ``gone`` says
        why when an incremental was asked), ``ready``; each disk's transfer opens when the job
        first reads that disk (``TransferDisk``)."""
        vm = self.vm
        disks, skipped = self.readable_disks()
        backup_id = str(uuid.uuid4())
        ovf, _consistency = await self.facts()
        await record("engine", self._config)
        await record("backup", {"vm_id": vm.id, "backup_id": backup_id})  # before it exists
        backup = t.Backup(
            id=backup_id,
            disks=[t.Disk(id=d.id) for d in disks],
            from_checkpoint_id=from_checkpoint,
            description=f"{checkpoints.DESCRIPTION_PREFIX}{new_checkpoint}",
        )

        await start_backup(self.client, vm.id, vm.name, backup)
        per_disk = {d.id: {"backup": "incremental" if d.incremental else "none"} for d in disks}
        info = self.vm_info(disks, ovf, skipped, per_disk=per_disk)
        session = BackupApiSession(self.client, info, backup_id, keep_checkpoints)
        try:
            ready = await wait_backup(self.client, vm.id, backup_id, {"ready"}, vm_name=vm.name)
            session.to_checkpoint = ready.to_checkpoint_id
            if ready.snapshot is not None and ready.snapshot.id:
                session.hybrid_snapshot = ready.snapshot.id
                log.info("hybrid backup", vm=vm.name, backup=backup_id, snapshot=ready.snapshot.id)
            modes = await backup_modes(self.client, vm.id, backup_id)
            transfers: list[str] = []

            async def created(transfer_id: str) -> None:
                transfers.append(transfer_id)
                await record("transfers", list(transfers))  # right after it exists

            for dinfo in info.disks:
                mode = modes.get(dinfo.disk_id, "full")
                incremental = from_checkpoint is not None and mode == "incremental"
                reason = gone
                if from_checkpoint is not None and not incremental:
                    reason = f"the engine reported backup_mode={mode} for this disk: full read"
                session._disks.append(
                    TransferDisk(
                        self.client,
                        dinfo,
                        parent_checkpoint if incremental else None,
                        reason,
                        add=partial(
                            add_transfer,
                            self.client,
                            f"disk {dinfo.disk_id}",
                            disk=t.Disk(id=dinfo.disk_id),
                            backup=t.Backup(id=backup_id),
                            direction=t.ImageTransferDirection.DOWNLOAD,
                        ),
                        created=created,
                        what=f"VM {vm.name}: backup {backup_id}: disk {dinfo.name}",
                        failpoint="ovirt.backup.transfer_finalize",
                    )
                )
        except BaseException as e:
            try:
                await session.close(success=False)
            except EngineError as cleanup:  # keep the first error; say what is left
                log.warning("backup cleanup failed", vm=vm.name, error=str(cleanup))
                e.add_note(f"cleanup: {cleanup}")
            raise
        return session
