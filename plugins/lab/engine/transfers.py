"""Image transfers of the fake engine (API-NOTES § 5): qemu-nbd exports behind imageio tickets.

- ``start``: validate as ``TransferDiskImageCommand``; a download transfer runs a read-only
  ``qemu-nbd`` on the disk's image (``--bitmap=<from checkpoint>`` for an incremental disk of
  a backup) and installs an ovirt-imageio ticket (``nbd:unix:<socket>``, ops read, ``dirty``
  only for an incremental disk); an upload runs a writable one (ops write). A download with
  ``snapshot_volume`` serves that VM-snapshot volume read-only (no bitmap).
- ``advance`` (one per GET): initializing → transferring, or paused_system when qemu-nbd or
  the ticket failed (event 1068; only cancel ends it); finalizing_* → finished_*.
- ``end``: finalize or cancel: remove the ticket, stop qemu-nbd, check an uploaded qcow2.
  A transfer that is already finalizing, finished or cancelled is refused with 409
  ``[Cannot finalize image transfer. Phase is finished_success.]`` (``cancel`` alike): a
  repeated finalize changes nothing, and a client has to recognise that answer as done.
- ``extend``: the ``extend`` action: the ticket expires ``Faults.ticket_timeout`` seconds
  from now again (imageio control ``PATCH /tickets/{id}``).

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
    TRANSFER_CANCELLED,
    TRANSFER_INITIATED,
    TRANSFER_SUCCEEDED,
    TRANSFER_TICKET_FAILED,
    Transfer,
    Volume,
)
from plugins.lab.engine.state import Disk, Vm
from plugins.lab.engine.volumes import BlockVolumeNbd
from plugins.lab.imageio import ImageioControlError


class ThrottledQemuNbd(qemu.QemuNbd):
    """``qemu-nbd`` whose image sits under a ``throttle`` filter of ``iops`` requests/s."""

    def __init__(self, image: Path, fmt: str, *, iops: int, **kwargs: object) -> None:
        super().__init__(image, fmt, **kwargs)  # type: ignore[arg-type]
        self.iops = iops

    def argv(self, socket: Path) -> list[str]:
        argv = [a for a in super().argv(socket)[:-1] if not a.startswith("--format=")]
        path = str(self.image).replace(",", ",,")  # qemu option syntax escapes commas
        opts = (
            f"driver=throttle,throttle-group=lab,file.driver={self.fmt},"
            f"file.file.driver=file,file.file.filename={path}"
        )
        group = f"throttle-group,id=lab,x-iops-total={self.iops}"
        return [*argv, "--object", group, "--image-opts", opts]


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
        if disk_id in a._busy_disks():
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
        failure = await _serve(
            a,
            nbd,
            ticket,
            t_id,
            disk,
            read_only=read_only,
            dirty=bitmap is not None,
            inactivity_timeout=inactivity_timeout,
        )
        t = Transfer(
            id=t_id,
            disk_id=disk_id,
            direction=direction,
            backup_id=backup_id,
            ticket=ticket,
            url=a.imageio.data_url(ticket),
            # The engine always picks a host: the VM's, else any host up in the data center.
            host_id=vm.host_id if vm and vm.host_id else next(iter(a.inventory.hosts), None),
            inactivity_timeout=inactivity_timeout or 60,
            timeout_policy=timeout_policy or "legacy",
            nbd=None if failure else nbd,
            failure=failure,
            snapshot_volume=snapshot_volume,
        )
        a.transfers[t.id] = t
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
    inactivity_timeout: int | None,
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


def _owner(a: Activity, disk_id: str) -> Vm | None:
    for v in a.inventory.vms.values():
        if any(a.disk_id == disk_id for a in v.attachments):
            return v
    return None


def advance(a: Activity, t: Transfer) -> None:
    """One polling step: initializing → transferring (paused_system if qemu-nbd or the
    ticket failed: cancel it); finalizing_* → finished_*."""
    step = {
        "initializing": "transferring",
        "finalizing_success": "finished_success",
        "finalizing_cleanup": "finished_cleanup",
    }
    if t.phase == "initializing" and t.failure:
        t.phase = "paused_system"
    else:
        t.phase = step.get(t.phase, t.phase)


async def end(a: Activity, t: Transfer, *, cancel: bool) -> None:
    """Finalize (or cancel): remove the ticket, stop qemu-nbd, check an uploaded qcow2."""
    async with a._lock:
        allowed = ("initializing", "transferring", "paused_system")
        if t.phase not in allowed or (t.failure and not cancel):
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
            t.phase = "finalizing_cleanup"
            code, what = TRANSFER_CANCELLED, "was cancelled"
        else:
            t.phase = "finalizing_success" if ok else "finished_failure"
            code, what = TRANSFER_SUCCEEDED if ok else 1034, "succeeded" if ok else "failed"
        vm = _owner(a, t.disk_id)
        a.event(
            code,
            f"Image {t.direction} of disk {disk.alias} {what} (transfer {t.id})",
            vm.id if vm else None,
        )
