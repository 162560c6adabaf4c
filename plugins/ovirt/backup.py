"""The incremental-backup-API flow (DESIGN §6, flow 1) as a ``Source``.

::

    open():  POST vms/{vm}/backups  (our own backup id, recorded first; from_checkpoint_id
             for an incremental)  ──poll──▶ ready  (hybrid mode: ``starting`` while the
             engine takes its snapshot; the backup then names it in ``<snapshot id>``)
             GET backups/{b}/disks → backup_mode per disk (full ⇒ full read, reason kept)
    read, disk by disk (``TransferDisk``: a transfer is open only while its disk is read):
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

Failures (API-NOTES § 4.8): a backup that goes FAILED raises ``OvirtBackupError`` quoting the
engine's last event about it (looked up by the backup id, as SDK-EX ``backup_vm.py`` does); a
transfer in any phase but initializing/resuming/transferring (paused_*, cancelled_*,
finalizing_failure, finished_*: the engine's inactivity monitor, a lost ticket, an
administrator) is cancelled at once, then raises naming the disk, the phase, the transfer and
the engine's event; a finalize that ends anywhere but ``finished_success`` raises at once the
same way; either way ``close`` then finalizes what is still open. Every transfer is created
with ``inactivity_timeout`` and ``timeout_policy=cancel`` (``new_transfer``); ``extend`` keeps
its ticket valid but not the transfer open (it does not reset imageio's idle time). A disk the
engine serves with ``backup_mode=full`` in an incremental backup (e.g. its bitmap is gone) is
read in full, the reason recorded in its ``fallback`` attribute. With ``require_quiesce`` a
running VM whose guest agent reports nothing is refused before anything is created.

Every engine object is recorded in the job journal before (backup: its id is ours) or right
after (transfers) it is created, so ``recover`` can finalize what a killed process left.
Finalizing is idempotent (``idempotent``): a transfer the engine already finalized (409
``Phase is finished_success``) or a backup it already finalized (400 ``already in
'succeeded' phase``) is done, so a process killed anywhere in ``close()`` (failpoints
``ovirt.backup.transfer_finalize.{sent,done}``, ``ovirt.backup.finalize.{sent,done}``) is
recovered, and a second recovery changes nothing.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.core.errors import ConfigError, EngineError
from engine.core.extent import Extent
from engine.sources.types import DiskInfo, ResourceRecorder, SourceDisk, VmInfo
from engine.util import failpoints
from plugins.ovirt import checkpoints
from plugins.ovirt.client import EngineApiError, EngineClient, EngineNotFound
from plugins.ovirt.idempotent import Steps, Wanted, already_done
from plugins.ovirt.imageio import ImageioDisk, ImageioReader
from plugins.ovirt.inventory import DiskRef, VmRef

CANCEL_TIMEOUT: Final = 120.0  # cancelling a transfer must not hang a failed job
log = structlog.get_logger("tessera.ovirt")

POLL_INTERVAL: Final = 0.25  # seconds between phase polls: engine phases move in seconds
READY_TIMEOUT: Final = 600.0  # a live backup with scratch disks can take minutes to start
FINALIZE_TIMEOUT: Final = 600.0  # hybrid finalize removes a snapshot (a block commit)
# Sent with every transfer (API-NOTES § 5.1), so no engine-config default decides it: the
# engine stops a transfer whose imageio ticket sat idle this long. Each transfer is open only
# while its disk is read, so idle time means a stalled job, and a minute is plenty.
INACTIVITY_TIMEOUT: Final = 60
# An idle transfer is cancelled (cancelled_system), not paused holding its disk locked until
# someone cancels it; the job then fails naming the disk and the phase.
TIMEOUT_POLICY: Final = t.ImageTransferTimeoutPolicy.CANCEL
# Transfer phases a client waits through; every other one but transferring is an end or a
# stuck state (paused_*: only a cancel or an administrator's resume moves it), handled at once.
_STARTING: Final = frozenset({"initializing", "resuming", "unknown"})
_FINALIZING: Final = frozenset({"initializing", "transferring", "resuming", "unknown"})


class OvirtBackupError(EngineError):
    template = "VM {vm}: backup {backup}: {reason}"


class TransferDisk:
    """A ``SourceDisk`` read through an image transfer that is open only while the job reads
    the disk: the first call (extents or a reader) creates the transfer with ``add`` (its id
    goes to ``created`` at once, for the journal), waits until it is ``transferring`` and
    connects to imageio; ``release()`` (the job read the disk) closes the connection and
    finalizes the transfer. The engine cancels a transfer whose ticket sat idle for its
    ``inactivity_timeout``: opened up front, a second disk's transfer would sit idle while the
    first is read. Shared by the backup-API and the snapshot flows."""

    def __init__(
        self,
        client: EngineClient,
        info: DiskInfo,
        checkpoint_parent: str | None,
        fallback_reason: str | None,
        *,
        add: Callable[[], Awaitable[Any]],
        created: Callable[[str], None],
        what: str,
        vm: str,
        failpoint: str,
    ) -> None:
        self.info = info
        self.checkpoint_parent = checkpoint_parent
        self.fallback_reason = fallback_reason
        self.transfer_id: str | None = None
        self._client = client
        self._add = add
        self._created = created
        self._what = what  # "disk <name>" (of backup B): errors name it
        self._vm = vm
        self._failpoint = failpoint
        self._image: ImageioDisk | None = None
        self._released = False
        self._lock = asyncio.Lock()  # readers start concurrently: one transfer

    async def image(self) -> ImageioDisk:
        """The connected imageio disk, the transfer made on first use."""
        async with self._lock:
            if self._released:
                raise RuntimeError(f"{self._what}: read after its transfer was released")
            if self._image is None:
                transfer = await self._add()
                self.transfer_id = transfer.id
                self._created(transfer.id)
                transfer = await wait_transfer(self._client, transfer, self._what, vm=self._vm)
                self._image = await ImageioDisk.connect(
                    transfer.transfer_url,
                    transfer.proxy_url,
                    ca=await self._client.engine_ca(),
                    keep_alive=keep_alive(self._client, transfer.id),
                )
            return self._image

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await (await self.image()).extents("zero", offset, length)

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await (await self.image()).extents("dirty", offset, length)

    async def open_reader(self) -> ImageioReader:
        return await (await self.image()).open_reader()

    async def release(self) -> None:
        """Close the imageio connection and finalize the transfer, once (idempotent; later
        calls do nothing, even after a failure: the job journal keeps the transfer for
        recovery). Raises what finalizing raised (``OvirtBackupError`` naming the disk)."""
        async with self._lock:
            if self._released:
                return
            self._released = True
            image, self._image = self._image, None
            if image is not None:
                await image.close()
            if self.transfer_id is not None:
                await finalize_transfer(
                    self._client, self.transfer_id, what=self._what, failpoint=self._failpoint
                )


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


class OvirtSourceBase:
    """What every oVirt backup flow shares: the VM, the engine client, the recovery config,
    and the guest facts read before anything is created on the engine.

    ``require_quiesce`` refuses (``ConfigError`` naming the VM, before anything is created) a
    running VM whose guest agent reports nothing: its backup could only be crash-consistent
    (API-NOTES § 7.1)."""

    plugin = "ovirt"

    def __init__(
        self,
        client: EngineClient,
        vm: VmRef,
        config: dict[str, Any],
        *,
        require_quiesce: bool = False,
    ):
        self.client = client
        self.vm = vm
        self.vm_id = vm.id
        self.vm_name = vm.name
        self.require_quiesce = require_quiesce
        self._config = config  # engine url/user/password_file/ca_file, for recovery

    def readable_disks(self) -> tuple[list[DiskRef], tuple[tuple[str, str], ...]]:
        """(the active disks a flow reads, (name, reason) of each disk it must skip).

        Direct LUNs and shareable disks are never put in a backup request, snapshot or
        transfer: the engine filters them out of backups and snapshots, and neither has an
        image to read (``DiskRef.skip_reason``). Inactive (unplugged) disks are left out as
        before, without a note."""
        disks, skipped = [], []
        for d in self.vm.disks:
            if (why := d.skip_reason) is not None:
                skipped.append((d.name, why))
                log.info("disk skipped", vm=self.vm.name, disk=d.name, reason=why)
            elif d.active:
                disks.append(d)
        return disks, tuple(skipped)

    async def facts(self) -> tuple[bytes | None, str]:
        """(OVF, consistency) from ``vm_facts``; raises ConfigError under require_quiesce."""
        ovf, consistency = await vm_facts(self.client, self.vm)
        if consistency == "crash" and self.require_quiesce:
            raise ConfigError(
                message=f"VM {self.vm.name}: no responsive guest agent (it reports no guest "
                "OS), so its backup cannot be quiesced; require_quiesce refuses a "
                "crash-consistent backup"
            )
        return ovf, consistency


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
        why when an incremental was asked); ready with every disk's transfer open."""
        vm = self.vm
        disks, skipped = self.readable_disks()
        backup_id = str(uuid.uuid4())
        ovf, _consistency = await self.facts()
        record("engine", self._config)
        record("backup", {"vm_id": vm.id, "backup_id": backup_id})  # before it exists
        backup = t.Backup(
            id=backup_id,
            disks=[t.Disk(id=d.id) for d in disks],
            from_checkpoint_id=from_checkpoint,
            description=f"{checkpoints.DESCRIPTION_PREFIX}{new_checkpoint}",
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
            skipped=skipped,
        )
        session = BackupApiSession(self.client, info, backup_id, keep_checkpoints)
        try:
            ready = await wait_backup(self.client, vm.id, backup_id, {"ready"}, vm_name=vm.name)
            session.to_checkpoint = ready.to_checkpoint_id
            if ready.snapshot is not None and ready.snapshot.id:
                session.hybrid_snapshot = ready.snapshot.id
                log.info("hybrid backup", vm=vm.name, backup=backup_id, snapshot=ready.snapshot.id)
            modes = await backup_modes(self.client, vm.id, backup_id)
            transfers: list[str] = []

            def created(transfer_id: str) -> None:
                transfers.append(transfer_id)
                record("transfers", list(transfers))  # right after it exists

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
                        add=partial(add_transfer, self.client, dinfo.disk_id, backup_id),
                        created=created,
                        what=f"{backup_id}: disk {dinfo.name}",
                        vm=vm.name,
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


async def vm_facts(client: EngineClient, vm: VmRef) -> tuple[bytes | None, str]:
    """The VM's OVF (read with ``all_content``, saved with every snapshot so a restore can
    recreate the VM) and the consistency a backup of it now gets: ``offline`` (not running),
    ``application`` (a guest agent reports, so it can freeze the filesystems) or ``crash``."""

    def get(conn: sdk.Connection) -> Any:
        return conn.system_service().vms_service().vm_service(vm.id).get(all_content=True)

    found = await client.call(get, "read VM configuration", obj=f"VM {vm.name}")
    config = found.initialization.configuration if found.initialization else None
    ovf = config.data.encode() if config is not None and config.data else None
    if found.status != t.VmStatus.UP:
        return ovf, "offline"
    agent = found.guest_operating_system is not None or bool(found.fqdn)
    return ovf, "application" if agent else "crash"


async def wait_backup(
    client: EngineClient,
    vm_id: str,
    backup_id: str,
    phases: set[str],
    *,
    vm_name: str | None = None,
) -> Any:
    """Poll the backup until its phase is one of ``phases``; FAILED raises, quoting the
    engine's last event about the backup."""
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
            event = await last_event(client, backup_id)
            raise OvirtBackupError(
                vm=vm_name or vm_id,
                backup=backup_id,
                reason=f"the engine reports FAILED: {event or 'no event says why'}",
            )
        if loop.time() > deadline:
            raise OvirtBackupError(vm=vm_name or vm_id, backup=backup_id, reason=f"still {phase}")
        await asyncio.sleep(POLL_INTERVAL)


async def check_snapshot_removed(
    client: EngineClient, vm_id: str, vm_name: str, snapshot_id: str
) -> bool:
    """After a hybrid backup ended: is the engine's snapshot gone, as it should be? The engine
    ends the backup ``succeeded`` even when removing it failed (event 10813
    ``VM_BACKUP_SNAPSHOT_POSSIBLE_LEFTOVER``, API-NOTES § 4.6); then a warning names it, for
    the administrator to remove (Tessera never deletes a snapshot it did not create)."""

    def exists(conn: sdk.Connection) -> bool:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        try:
            vm.snapshots_service().snapshot_service(snapshot_id).get()
        except sdk.NotFoundError:
            return False
        return True

    if not await client.call(exists, "read snapshot", obj=f"snapshot {snapshot_id}"):
        return True
    log.warning(
        "the engine left the snapshot of a hybrid backup",
        vm=vm_name,
        snapshot=snapshot_id,
        hint="remove it in the engine once no backup runs",
    )
    return False


async def last_event(client: EngineClient, text: str) -> str | None:
    """The description of the newest engine event that mentions ``text`` (a backup or transfer
    id: the engine's free-text event search, API-NOTES § 9.2), or None. Best effort: an
    engine error while looking is logged and gives None, so it never hides the failure."""

    def newest(conn: sdk.Connection) -> str | None:
        events = conn.system_service().events_service().list(search=text, max=1)
        return str(events[0].description) if events and events[0].description else None

    try:
        return await client.call(newest, "list events", obj=f"events about {text}")
    except EngineError as e:
        log.warning("cannot read engine events", about=text, error=str(e))
        return None


async def backup_modes(client: EngineClient, vm_id: str, backup_id: str) -> dict[str, str]:
    def get(conn: sdk.Connection) -> dict[str, str]:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        disks = vm.backups_service().backup_service(backup_id).disks_service().list()
        return {d.id: str(d.backup_mode.value) if d.backup_mode else "full" for d in disks}

    return await client.call(get, "list backup disks", obj=f"backup {backup_id}")


def new_transfer(**fields: Any) -> t.ImageTransfer:
    """The body of a new image transfer: raw guest data, ``INACTIVITY_TIMEOUT`` and
    ``TIMEOUT_POLICY`` always sent, plus ``fields`` (direction, disk / snapshot, backup)."""
    return t.ImageTransfer(
        format=t.DiskFormat.RAW,
        inactivity_timeout=INACTIVITY_TIMEOUT,
        timeout_policy=TIMEOUT_POLICY,
        **fields,
    )


async def add_transfer(client: EngineClient, disk_id: str, backup_id: str) -> Any:
    """Create the download transfer of one disk of a backup; return it as created (not yet
    ``transferring``: record its id, then ``wait_transfer``)."""

    def add(conn: sdk.Connection) -> Any:
        return (
            conn.system_service()
            .image_transfers_service()
            .add(
                new_transfer(
                    disk=t.Disk(id=disk_id),
                    backup=t.Backup(id=backup_id),
                    direction=t.ImageTransferDirection.DOWNLOAD,
                )
            )
        )

    return await client.call(add, "start image transfer", obj=f"disk {disk_id}", idempotent=False)


def _phase(transfer: Any) -> str:
    return str(transfer.phase.value) if transfer.phase is not None else "unknown"


async def wait_transfer(client: EngineClient, transfer: Any, what: str, *, vm: str = "?") -> Any:
    """Poll a new transfer until ``transferring`` (it then has its URLs) and return it.

    Any other phase than initializing/resuming (paused_system, paused_user, cancelled_*,
    finalizing_*, finished_*) is an end or a stuck state: the transfer is cancelled (so nothing
    is left open and its backup can be finalized; a no-op on one that ended) and
    ``OvirtBackupError`` raised at once naming ``what`` it reads (the disk), the phase, the
    transfer and the engine's last event about it; a timeout cancels and raises too."""
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

    while (phase := _phase(transfer)) != "transferring":
        stuck = None
        if phase not in _STARTING:
            stuck = f"is {phase}"
        elif loop.time() > deadline:
            stuck = f"never started (still {phase})"
        if stuck is not None:
            event = await last_event(client, transfer_id)
            await cancel_transfer(client, transfer_id)
            raise OvirtBackupError(
                vm=vm,
                backup=what,
                reason=f"transfer {transfer_id} {stuck} ({event or 'no event says why'}); "
                "cancelled",
            )
        await asyncio.sleep(POLL_INTERVAL)
        transfer = await client.call(get, "poll image transfer", obj=f"transfer {transfer_id}")
    return transfer


def keep_alive(client: EngineClient, transfer_id: str) -> Callable[[], Awaitable[None]]:
    """The ``extend`` action of a transfer (it renews the transfer's imageio ticket), for
    ``ImageioDisk.connect(keep_alive=...)``. It does not reset the ticket's idle time (the
    engine's inactivity monitor reads imageio's ``idle_time``, which only requests to imageio
    reset), so it keeps a ticket valid, never an idle transfer open."""

    def extend(conn: sdk.Connection) -> None:
        service = conn.system_service().image_transfers_service()
        service.image_transfer_service(transfer_id).extend()

    async def call() -> None:
        await client.call(extend, "extend image transfer", obj=f"transfer {transfer_id}")

    return call


async def cancel_transfer(client: EngineClient, transfer_id: str) -> bool:
    """Cancel a transfer and wait until it finished (or is gone, or CANCEL_TIMEOUT passed).
    An upload's disk is then illegal and can be deleted. False when it had already ended
    (``idempotent.already_done``: finalized, finished, cancelled or gone)."""

    def service(conn: sdk.Connection) -> Any:
        return conn.system_service().image_transfers_service().image_transfer_service(transfer_id)

    def cancel(conn: sdk.Connection) -> bool:
        try:
            current = service(conn).get().phase
            phase = str(current.value) if current else ""
            if phase.startswith(("finished", "finalizing", "cancel")):
                return False
            service(conn).cancel()
        except sdk.Error as e:
            if already_done(e, Wanted.TRANSFER_ENDED):
                return False
            raise
        return True

    def phase(conn: sdk.Connection) -> str | None:
        try:
            return _phase(service(conn).get())
        except sdk.NotFoundError:
            return None

    what = f"transfer {transfer_id}"
    acted = await client.call(cancel, "cancel image transfer", obj=what)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_TIMEOUT
    while (current := await client.call(phase, "poll image transfer", obj=what)) is not None:
        if current.startswith("finished") or loop.time() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
    return acted


async def finalize_transfer(
    client: EngineClient,
    transfer_id: str,
    *,
    what: str | None = None,
    failpoint: str | None = None,
) -> bool:
    """Finalize a transfer and wait until the engine says it finished (the engine refuses to
    finalize a backup while any of its transfers is still finalizing).

    Returns False when it already was finalizing, finished, cancelled or gone (the engine's
    409 ``Phase is …`` or 404, ``idempotent.already_done``): it is still waited for. Raises
    ``OvirtBackupError`` at once, naming ``what`` (the disk), the phase and the transfer, when
    it is anywhere but on its way to ``finished_success`` (finalizing_failure,
    finished_failure, cancelled_*, finalizing_cleanup, finished_cleanup, paused_*), whoever
    ended it: a cancelled or paused transfer is never finalized, so waiting is pointless.
    ``failpoint`` (crash tests) is hit after the finalize was sent, with ``.sent``, and once
    the transfer finished, with ``.done``."""

    def service(conn: sdk.Connection) -> Any:
        return conn.system_service().image_transfers_service().image_transfer_service(transfer_id)

    def finalize(conn: sdk.Connection) -> bool:
        try:
            service(conn).finalize()
        except sdk.Error as e:
            if already_done(e, Wanted.TRANSFER_ENDED):
                return False
            raise
        return True

    def phase(conn: sdk.Connection) -> str | None:
        try:
            return _phase(service(conn).get())
        except sdk.NotFoundError:
            return None

    name = f"transfer {transfer_id}"
    subject = what or name

    def failed(reason: str) -> OvirtBackupError:
        return OvirtBackupError(vm="?", backup=subject, reason=f"{name} {reason}")

    acted = await client.call(finalize, "finalize image transfer", obj=name)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINALIZE_TIMEOUT
    while (current := await client.call(phase, "poll image transfer", obj=name)) is not None:
        if current == "finished_success":
            break
        if current != "finalizing_success" and current not in _FINALIZING:
            raise failed(f"is {current}, not finalized")
        if loop.time() > deadline:
            raise failed(f"still {current}")
        await asyncio.sleep(POLL_INTERVAL)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted


async def end_transfer(client: EngineClient, transfer_id: str) -> bool:
    """Recovery: leave the transfer ended, however. Finalize it; one the engine will not
    finalize (``paused_system``) or that did not end ``finished_success`` is cancelled
    (which changes nothing on one that already ended). False when it had already ended."""
    try:
        return await finalize_transfer(client, transfer_id)
    except (EngineApiError, OvirtBackupError) as e:
        log.info("cannot finalize, cancelling", transfer=transfer_id, error=str(e))
        return await cancel_transfer(client, transfer_id)


async def finalize_backup(
    client: EngineClient, vm_id: str, backup_id: str, *, failpoint: str | None = None
) -> bool:
    """Finalize the backup and wait until it ended (``succeeded`` or ``failed``).

    Returns False when there was nothing to finalize: the engine answered that it is already
    finalizing or ended, or it never existed or was purged (``idempotent.already_done``).
    ``failpoint`` as for ``finalize_transfer``."""

    def finalize(conn: sdk.Connection) -> bool:
        vm = conn.system_service().vms_service().vm_service(vm_id)
        try:
            vm.backups_service().backup_service(backup_id).finalize()
        except sdk.Error as e:
            if already_done(e, Wanted.BACKUP_FINALIZED):
                return False
            raise
        return True

    acted = await client.call(finalize, "finalize backup", obj=f"backup {backup_id}")
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    with contextlib.suppress(EngineNotFound):  # never created, or purged after it ended
        await wait_backup(client, vm_id, backup_id, {"succeeded", "failed"})
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted


async def recover(resources: dict[str, Any], committed: bool) -> list[str]:
    """Finalize the transfers, the backup and remove the snapshot a killed job left on the
    engine (either flow: ``backup`` is flow 1's, ``snapshot`` flow 2's); for a killed restore
    into the engine, delete the VM it created (``restore_vm``: with ``detach_only``, so its
    disks stay), cancel its uploads (``restore_transfers``) and delete every disk it created
    (``restore_disks``).

    Every step is idempotent and runs even when an earlier one failed (``idempotent.Steps``):
    returns what it changed (``[]`` when everything already was cleaned up), or raises
    ``OvirtRecoveryError`` naming every step that failed."""
    from plugins.ovirt.client import EngineConfig  # noqa: PLC0415 - only recovery needs it
    from plugins.ovirt.restore import delete_disk, delete_vm  # noqa: PLC0415 - imports this
    from plugins.ovirt.snapshot import remove_snapshot  # noqa: PLC0415 - imports this module

    backup = resources.get("backup")
    snapshot = resources.get("snapshot")
    engine = resources.get("engine")
    restored = resources.get("restore_disks")
    restored_vm = resources.get("restore_vm")
    if not (backup or snapshot or restored or restored_vm) or not engine:
        return []
    config = EngineConfig.from_record(engine)
    steps = Steps()
    async with EngineClient(config) as client:
        for transfer_id in resources.get("transfers", []):
            await steps.run(
                end_transfer(client, transfer_id),
                f"finalize image transfer {transfer_id}",
                f"finalized image transfer {transfer_id}",
            )
        if backup:
            await steps.run(
                finalize_backup(client, backup["vm_id"], backup["backup_id"]),
                f"finalize backup {backup['backup_id']}",
                f"finalized backup {backup['backup_id']} of VM {backup['vm_id']}",
            )
        if snapshot:
            await steps.run(
                remove_snapshot(client, snapshot["vm_id"], snapshot["snapshot_id"]),
                f"remove snapshot {snapshot['snapshot_id']}",
                f"removed snapshot {snapshot['snapshot_id']} of VM {snapshot['vm_id']}",
            )
        # A killed restore: nothing of it is worth keeping. The VM first: the disks are
        # attached to it.
        if restored_vm:
            await steps.run(
                delete_vm(client, restored_vm),
                f"delete restored VM {restored_vm}",
                f"deleted restored VM {restored_vm}",
            )
        for transfer_id in resources.get("restore_transfers", []):
            await steps.run(
                cancel_transfer(client, transfer_id),
                f"cancel upload transfer {transfer_id}",
                f"cancelled upload transfer {transfer_id}",
            )
        for disk_id in restored or []:
            await steps.run(
                delete_disk(client, disk_id),
                f"delete restored disk {disk_id}",
                f"deleted restored disk {disk_id}",
            )
    return steps.result()
