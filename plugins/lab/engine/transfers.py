"""Image transfers of the fake engine (API-NOTES § 5): qemu-nbd exports behind imageio tickets.

- ``start``: validate as ``TransferDiskImageCommand`` (a disk still being created, or in
  another transfer, is locked: 409); a transfer of a disk (not of a backup or a snapshot
  volume) shows the disk ``locked`` until the transfer is finished (``finished_*``). A
  download transfer runs a read-only ``qemu-nbd`` on the disk's image
  (``--bitmap=<from checkpoint>`` for an incremental disk of a backup) and installs an
  ovirt-imageio ticket (``nbd:unix:<socket>``, ops read, ``dirty`` only for an incremental
  disk); an upload runs a writable one (ops write). A download with ``snapshot_volume``
  serves that VM-snapshot volume read-only (no bitmap).
- ``step`` (the engine's background monitor, ``monitor``, never a GET): initializing →
  transferring, or paused_system when qemu-nbd or the ticket failed (event 1068; only cancel
  ends it); while transferring, the ticket's ``idle_time`` (read from imageio's control API,
  as the engine reads it through vdsm) is compared with the transfer's ``inactivity_timeout``
  and an idle transfer is stopped by its ``timeout_policy`` (``time_out``); cancelled_user →
  finalizing_cleanup → finished_cleanup, cancelled_system → finalizing_failure →
  finished_failure, finalizing_success → finished_success. One step per
  ``Faults.phase_seconds``; paused_system and paused_user stay until cancelled.
- ``end``: finalize or cancel: remove the ticket, stop qemu-nbd, check an uploaded qcow2.
  A transfer that is already finalizing, finished or cancelled is refused with 409
  ``[Cannot finalize image transfer. Phase is finished_success.]`` (``cancel`` alike): a
  repeated finalize changes nothing, and a client has to recognise that answer as done.
- ``extend``: the ``extend`` action: the ticket expires ``Faults.ticket_timeout`` seconds
  from now again (imageio control ``PATCH /tickets/{id}``). It does not touch the ticket's
  ``idle_time``: only a request to imageio's data API does (a read, ``OPTIONS``).

Every transfer has a host, as on the engine: the VM's when it runs, else one the engine picks
(the first host of the VM's cluster, or the first host at all for a floating disk).

Tickets get ``Faults.ticket_timeout`` seconds (the engine's
``ImageTransferClientTicketValidityInSeconds``, 300). imageio refuses every request on an
expired ticket with 403 (API-NOTES § 12.10), and itself pushes the expiry to ``timeout``
seconds after each request it completes (``Ticket.touch``): a ticket expires when nobody used
it for that long, e.g. the transfer of a backup's second disk while the first is read. The
real engine also renews tickets while it monitors transfers; this fake renews them only on
``extend`` (counted in ``Activity.extends``), so a client that never extends loses an idle
transfer. ``Faults.storage_iops`` makes the storage
slow: every export goes through a qemu ``throttle`` filter of that many requests per second.
An upload into a thin disk on a block domain cannot write past its volume's allocation
(``volumes.BlockVolumeNbd``): imageio then fails the request with ENOSPC.
"""

from dataclasses import replace
from pathlib import Path

from engine.io import qemu
from plugins.lab.engine import hybrid
from plugins.lab.engine.api import Fault
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.records import (
    DEFAULT_INACTIVITY_TIMEOUT,
    TRANSFER_CANCELLED,
    TRANSFER_CANCELLED_TIMEOUT,
    TRANSFER_DOWNLOAD_CANCELLED_TIMEOUT,
    TRANSFER_INITIATED,
    TRANSFER_PAUSED_TIMEOUT,
    TRANSFER_SUCCEEDED,
    TRANSFER_TICKET_FAILED,
    Transfer,
    Volume,
)
from plugins.lab.engine.state import Disk, Vm
from plugins.lab.engine.volumes import BlockVolumeNbd, ThrottledQemuNbd
from plugins.lab.imageio import ImageioControlError


def _nbd(
    a: Activity, image: Path, fmt: str, *, read_only: bool, bitmap: str | None
) -> qemu.QemuNbd:
    size = a.volume_sizes.get(image)
    if size is not None and not read_only:  # a block volume: an upload cannot extend it
        return BlockVolumeNbd(image, fmt, size=size, iops=a.faults.storage_iops)
    if a.faults.storage_iops > 0:
        return ThrottledQemuNbd(
            image, fmt, iops=a.faults.storage_iops, read_only=read_only, bitmap=bitmap
        )
    return qemu.QemuNbd(image, fmt, read_only=read_only, bitmap=bitmap)


async def extend(a: Activity, t: Transfer) -> None:
    """The ``extend`` action: renew the ticket of a transferring transfer."""
    if t.phase != "transferring" or t.nbd is None:
        raise Fault(409, f"[Cannot extend image transfer. Phase is {t.phase}.]")
    assert a.imageio is not None  # a transfer with an export has a ticket
    try:
        await a.imageio.extend_ticket(t.ticket, a.faults.ticket_timeout)
    except ImageioControlError as e:
        raise Fault(409, f"[Cannot extend image transfer {t.id}: {e}]") from e
    a.extends[t.id] = a.extends.get(t.id, 0) + 1


async def start(
    a: Activity,
    disk_id: str | None,
    backup_id: str | None,
    direction: str,
    fmt: str,
    inactivity_timeout: int | None,
    timeout_policy: str | None,
    snapshot_volume: str | None = None,
) -> Transfer:
    """Validate as ``TransferDiskImageCommand``, start qemu-nbd, install the ticket.

    ``snapshot_volume`` (``<snapshot id>``, a disk snapshot id) downloads that snapshot
    volume of the disk, read-only, whether the VM runs or not."""
    async with a._lock:
        volume = _volume(a, snapshot_volume, disk_id, direction) if snapshot_volume else None
        disk_id = volume.disk_id if volume else disk_id
        if disk_id is None or disk_id not in a.inventory.disks:
            raise Fault(404, f"Entity not found: disk {disk_id}", "Not Found")
        disk = a.inventory.disks[disk_id]
        if a.imageio is None:
            raise Fault(409, "[Cannot transfer Virtual Disk. The lab runs no ovirt-imageio.]")
        b = a.backups.get(backup_id) if backup_id else None
        if backup_id and b is None:
            raise Fault(404, f"Entity not found: backup {backup_id}", "Not Found")
        if disk.status == "locked" or disk_id in a._busy_disks():  # being created, or busy
            raise Fault(409, f"[Cannot transfer Virtual Disk. Disk {disk.alias} is locked.]")
        bitmap = None
        if b is not None:
            if direction != "download":
                raise Fault(400, "[Cannot transfer Virtual Disk. Backups are downloads.]")
            if fmt == "cow":
                raise Fault(400, "[Cannot transfer Virtual Disk. Format cow is not applicable.]")
            if b.phase != "ready":
                raise Fault(
                    409,
                    "[Cannot transfer Virtual Disk. The VM backup is not ready, "
                    f"backup phase is {b.phase.upper()}.]",
                )
            if disk_id not in b.disk_ids:
                raise Fault(400, f"[Cannot transfer Virtual Disk. Disk {disk_id} not in backup.]")
            if b.modes[disk_id] == "incremental":
                bitmap = b.from_checkpoint_id
            volume = hybrid.volume(a, b, disk_id)  # a hybrid backup reads its snapshot
        elif volume is None and _plugged_running(a, disk_id):
            raise Fault(
                409, "[Cannot transfer Virtual Disk. The disk is plugged into a running VM.]"
            )
        image = volume.path if volume else a.image(disk)
        read_only = direction == "download"
        vm = _owner(a, disk_id)
        nbd = _nbd(
            a,
            image,
            volume.fmt if volume else a.active_format(disk),
            read_only=read_only,
            bitmap=bitmap,
        )
        t_id, ticket = a.new_id(), a.new_id()
        idle_limit = a.faults.inactivity_timeout or inactivity_timeout or DEFAULT_INACTIVITY_TIMEOUT
        failure = await _serve(
            a,
            nbd,
            ticket,
            t_id,
            disk,
            read_only=read_only,
            dirty=bitmap is not None,
            inactivity_timeout=idle_limit,
        )
        t = Transfer(
            id=t_id,
            disk_id=disk_id,
            direction=direction,
            backup_id=backup_id,
            ticket=ticket,
            url=a.imageio.data_url(ticket),
            host_id=_host(a, vm),
            inactivity_timeout=idle_limit,
            timeout_policy=timeout_policy or "legacy",
            nbd=None if failure else nbd,
            failure=failure,
            snapshot_volume=snapshot_volume,
            since=a.clock.now(),
            # The engine locks the image of a disk it transfers (``lockImage``): its status
            # is locked until the transfer is finished. A backup's transfers and a snapshot
            # volume's leave the active image alone.
            locks_disk=b is None and snapshot_volume is None,
        )
        a.transfers[t.id] = t
        if t.locks_disk:
            a.inventory.disks[disk_id] = replace(disk, status="locked")
        a.event(
            TRANSFER_INITIATED,
            f"Image {direction} of disk {disk.alias} was initiated (transfer {t.id})",
            vm.id if vm else None,
        )
        if failure:
            a.event(
                TRANSFER_TICKET_FAILED,
                f"Transfer {t.id} was stopped by system. Reason: failed to create a ticket: "
                f"{failure}",
                vm.id if vm else None,
                "error",
            )
        return t


async def _serve(
    a: Activity,
    nbd: qemu.QemuNbd,
    ticket: str,
    transfer_id: str,
    disk: Disk,
    *,
    read_only: bool,
    dirty: bool,
    inactivity_timeout: int,
) -> str | None:
    """Start qemu-nbd and install the ticket; return why that failed (the transfer then
    pauses), or None. ``Faults.pause_transfers`` fails it without starting anything."""
    if a.faults.pause_transfers:
        return "paused by the lab (Faults.pause_transfers)"
    assert a.imageio is not None  # start refused the transfer otherwise
    try:
        await nbd.start()
        await a.imageio.add_ticket(
            ticket,
            f"nbd:unix:{nbd.address}",
            disk.provisioned_size,
            ["read"] if read_only else ["write"],
            dirty=dirty,
            transfer_id=transfer_id,
            sparse=disk.sparse,
            inactivity_timeout=inactivity_timeout,
            timeout=a.faults.ticket_timeout,
        )
    except (qemu.QemuError, ImageioControlError) as e:
        # As vdsm's BitmapDoesNotExist & co: the transfer pauses (API-NOTES § 4.8).
        await nbd.stop()
        return str(e)
    except BaseException:
        await nbd.stop()
        raise
    return None


def _volume(a: Activity, volume_id: str, disk_id: str | None, direction: str) -> Volume:
    """The snapshot volume a transfer names; it must be a download of an ok snapshot."""
    if direction != "download":
        raise Fault(400, "[Cannot transfer Virtual Disk. Snapshots are read-only.]")
    for s in a.snapshots.values():
        for v in s.volumes.values():
            if v.id == volume_id:
                if s.status != "ok":
                    raise Fault(
                        409, f"[Cannot transfer Virtual Disk. Snapshot {s.id} is {s.status}.]"
                    )
                if disk_id not in (None, v.disk_id):
                    raise Fault(
                        400,
                        f"[Cannot transfer Virtual Disk. {volume_id} is not a snapshot "
                        f"of disk {disk_id}.]",
                    )
                return v
    raise Fault(404, f"Entity not found: disk snapshot {volume_id}", "Not Found")


def _plugged_running(a: Activity, disk_id: str) -> bool:
    return any(
        v.status != "down" and any(a.disk_id == disk_id and a.active for a in v.attachments)
        for v in a.inventory.vms.values()
    )


def _host(a: Activity, vm: Vm | None) -> str:
    """The host serving a transfer: the running VM's, else the engine's pick."""
    if vm is not None and vm.host_id:
        return vm.host_id
    hosts = list(a.inventory.hosts.values())
    if not hosts:
        raise Fault(409, "[Cannot transfer Virtual Disk. No host is up in the data center.]")
    mine = [h for h in hosts if vm is not None and h.cluster_id == vm.cluster_id]
    return (mine or hosts)[0].id


def _owner(a: Activity, disk_id: str) -> Vm | None:
    for v in a.inventory.vms.values():
        if any(a.disk_id == disk_id for a in v.attachments):
            return v
    return None


# The engine's background steps: phase → the next one, one per ``Faults.phase_seconds``.
_NEXT = {
    "finalizing_success": "finished_success",
    "finalizing_failure": "finished_failure",
    "cancelled_user": "finalizing_cleanup",
    "finalizing_cleanup": "finished_cleanup",
    "cancelled_system": "finalizing_failure",
}


def _phase(a: Activity, t: Transfer, phase: str) -> None:
    t.phase = phase
    t.since = a.clock.now()
    if phase.startswith("finished_") and t.locks_disk:
        disk = a.inventory.disks.get(t.disk_id)
        if disk is not None and disk.status == "locked":  # an illegal one stays illegal
            a.inventory.disks[disk.id] = replace(disk, status="ok")


async def step(a: Activity, t: Transfer) -> None:
    """One look of the engine's monitor at ``t`` (module docstring); the caller holds the
    lock. A phase younger than ``Faults.phase_seconds`` stays."""
    if not a.due(t.since):
        return
    if t.phase == "initializing":
        _phase(a, t, "paused_system" if t.failure else "transferring")
    elif t.phase in _NEXT:
        _phase(a, t, _NEXT[t.phase])
    elif t.phase == "transferring" and t.nbd is not None and a.imageio is not None:
        try:
            ticket = await a.imageio.get_ticket(t.ticket)
        except ImageioControlError:
            return  # as vdsm's failed status call: the engine looks again next time
        idle = int(ticket.get("idle_time") or 0)
        if idle > t.inactivity_timeout:
            await time_out(a, t, idle)


async def time_out(a: Activity, t: Transfer, idle: int) -> None:
    """The client left ``t`` idle past its ``inactivity_timeout``: stop it by its
    ``timeout_policy`` (API-NOTES § 5.2): ``cancel``, or ``legacy`` for a download, →
    cancelled_system (→ finalizing_failure → finished_failure); ``pause``, or ``legacy`` for
    an upload, → paused_system (only cancel ends it). Either way the ticket is removed and
    qemu-nbd stopped; a cancelled upload leaves its disk illegal."""
    cancel = t.timeout_policy == "cancel" or (
        t.timeout_policy == "legacy" and t.direction == "download"
    )
    await a._release(t)
    disk = a.inventory.disks[t.disk_id]
    why = f"the client was inactive for {idle} s (inactivity_timeout {t.inactivity_timeout} s)"
    if cancel:
        _phase(a, t, "cancelled_system")
        if t.direction == "upload":
            a.inventory.disks[disk.id] = replace(disk, status="illegal")
        code = (
            TRANSFER_CANCELLED_TIMEOUT
            if t.timeout_policy == "cancel"
            else TRANSFER_DOWNLOAD_CANCELLED_TIMEOUT
        )
        what = "was cancelled by the system"
    else:
        _phase(a, t, "paused_system")
        code, what = TRANSFER_PAUSED_TIMEOUT, "was paused by the system"
    vm = _owner(a, t.disk_id)
    a.event(
        code,
        f"Image {t.direction} of disk {disk.alias} {what} (transfer {t.id}): {why}",
        vm.id if vm else None,
        "error",
    )


async def end(a: Activity, t: Transfer, *, cancel: bool) -> None:
    """Finalize (or cancel): remove the ticket, stop qemu-nbd, check an uploaded qcow2."""
    async with a._lock:
        allowed = ("initializing", "transferring", "paused_system", "paused_user")
        if t.phase not in allowed or (not cancel and (t.failure or t.phase.startswith("paused"))):
            action = "cancel" if cancel else "finalize"
            raise Fault(409, f"[Cannot {action} image transfer. Phase is {t.phase}.]")
        await a._release(t)
        disk = a.inventory.disks[t.disk_id]
        ok = True
        if t.direction == "upload" and not cancel and disk.format == "cow":
            try:
                await qemu.qemu_img("check", "-q", "-f", "qcow2", a.image(disk))
            except qemu.QemuError:
                ok = False
        if t.direction == "upload" and (cancel or not ok):
            # An upload that did not succeed leaves the disk illegal (API-NOTES § 5.2).
            a.inventory.disks[disk.id] = replace(disk, status="illegal")
        if cancel:
            _phase(a, t, "cancelled_user")
            code, what = TRANSFER_CANCELLED, "was cancelled"
        else:
            _phase(a, t, "finalizing_success" if ok else "finalizing_failure")
            code, what = TRANSFER_SUCCEEDED if ok else 1034, "succeeded" if ok else "failed"
        vm = _owner(a, t.disk_id)
        a.event(
            code,
            f"Image {t.direction} of disk {disk.alias} {what} (transfer {t.id})",
            vm.id if vm else None,
        )
