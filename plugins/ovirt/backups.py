"""The engine's VM backups (the incremental-backup API, API-NOTES § 4): start, wait for a
phase, read each disk's ``backup_mode``, finalize; used by the backup flow (``backup``) and by
``recovery``.

::

    start_backup     POST vms/{vm}/backups (our own backup id: record it before calling)
    wait_backup      ──poll──▶ one of the wanted phases; ``failed`` raises quoting the
                     engine's last event about the backup
    backup_modes     GET backups/{b}/disks → disk id → ``full`` | ``incremental``
    finalize_backup  POST …/finalize ──poll──▶ succeeded | failed (idempotent)
    check_snapshot_removed  a hybrid backup's snapshot still there afterwards (event 10813)
"""

import contextlib
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.core.errors import EngineError
from engine.util import failpoints
from plugins.ovirt.client import EngineClient, EngineNotFound
from plugins.ovirt.events import last_event
from plugins.ovirt.idempotent import Wanted, already_done
from plugins.ovirt.polling import Wait

log = structlog.get_logger("tessera.ovirt")

READY_TIMEOUT: Final = 600.0  # a live backup with scratch disks can take minutes to start
FINALIZE_TIMEOUT: Final = 600.0  # hybrid finalize removes a snapshot (a block commit)


class OvirtBackupError(EngineError):
    template = "VM {vm}: backup {backup}: {reason}"


def _service(conn: sdk.Connection, vm_id: str, backup_id: str) -> Any:
    vm = conn.system_service().vms_service().vm_service(vm_id)
    return vm.backups_service().backup_service(backup_id)


async def start_backup(client: EngineClient, vm_id: str, vm_name: str, backup: t.Backup) -> Any:
    """POST the backup (never retried: a repeated POST would start a second one)."""

    def start(conn: sdk.Connection) -> Any:
        vms = conn.system_service().vms_service()
        return vms.vm_service(vm_id).backups_service().add(backup)

    return await client.call(start, "start backup", obj=f"VM {vm_name}", idempotent=False)


async def wait_backup(
    client: EngineClient,
    vm_id: str,
    backup_id: str,
    phases: set[str],
    *,
    vm_name: str | None = None,
    timeout: float = READY_TIMEOUT,
) -> Any:
    """Poll the backup until its phase is one of ``phases``; FAILED raises, quoting the
    engine's last event about the backup; so does ``timeout``."""
    wait = Wait(client.clock, timeout)

    def get(conn: sdk.Connection) -> Any:
        return _service(conn, vm_id, backup_id).get()

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
        if wait.expired:
            raise OvirtBackupError(vm=vm_name or vm_id, backup=backup_id, reason=f"still {phase}")
        await wait.pause()


async def backup_modes(client: EngineClient, vm_id: str, backup_id: str) -> dict[str, str]:
    """Disk id → how the engine serves it in this backup: ``incremental`` or ``full`` (an
    incremental backup's disk whose bitmap is gone is served in full)."""

    def get(conn: sdk.Connection) -> dict[str, str]:
        disks = _service(conn, vm_id, backup_id).disks_service().list()
        return {d.id: str(d.backup_mode.value) if d.backup_mode else "full" for d in disks}

    return await client.call(get, "list backup disks", obj=f"backup {backup_id}")


async def finalize_backup(
    client: EngineClient, vm_id: str, backup_id: str, *, failpoint: str | None = None
) -> bool:
    """Finalize the backup and wait until it ended (``succeeded`` or ``failed``).

    Returns False when there was nothing to finalize: the engine answered that it is already
    finalizing or ended, or it never existed or was purged (``idempotent.already_done``).
    ``failpoint`` (crash tests) is hit after the finalize was sent (``.sent``) and once the
    backup ended (``.done``)."""

    def finalize(conn: sdk.Connection) -> bool:
        try:
            _service(conn, vm_id, backup_id).finalize()
        except sdk.Error as e:
            if already_done(e, Wanted.BACKUP_FINALIZED):
                return False
            raise
        return True

    acted = await client.call(finalize, "finalize backup", obj=f"backup {backup_id}")
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    with contextlib.suppress(EngineNotFound):  # never created, or purged after it ended
        await wait_backup(
            client, vm_id, backup_id, {"succeeded", "failed"}, timeout=FINALIZE_TIMEOUT
        )
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted


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
