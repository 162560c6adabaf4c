"""VM snapshots of the fake engine as qcow2 overlays (API-NOTES § 7, § 11.3, § 11.4).

Creating a snapshot of a VM, for each disk with an image (``Activity.images``):

- the disk's current top file is **renamed** to ``<image>.<volume id>`` (same directory, so a
  relative backing path of a template stays valid): that is the snapshot's volume, read-only
  from now on, keeping its format (a raw disk's volume stays raw, as in the real engine: raw
  base + qcow2 overlay);
- a qcow2 overlay is created **at the image's original path**, backed by that volume
  (``qemu-img create -f qcow2 -b <volume> -F <fmt>``), so ``Activity.images`` and anyone
  writing "the VM's disk" (tests with qemu-io) keep using the same path for the active layer;
- every bitmap of the volume is added, empty and enabled, to the overlay (libvirt does the
  same on a live snapshot), so checkpoints keep tracking writes made after the snapshot.

Deleting it merges each overlay bitmap into the volume's bitmap of the same name
(``qemu-img bitmap --merge``), commits the overlay into the volume (``qemu-img commit -d``)
and renames the volume back to the original path: the content the VM sees is unchanged and
checkpoints stay usable.

Limits, kept simple on purpose: one snapshot per VM at a time (a second one is a 409); no
backup of a VM while it has a snapshot and no snapshot during a backup (409 both ways); no
preview/restore. Phases advance per GET like the rest of the fake: created ``locked`` → ``ok``
on the next GET; after ``DELETE`` (the merge runs at once) the snapshot shows ``locked`` on
one more GET, then is gone (404). A ``DELETE`` of a ``locked`` snapshot (being created or
already being removed) is a 409 ``Snapshot is locked``. The list also shows the VM's
``Active VM`` snapshot (type ``active``), as the real engine does; it cannot be deleted.
"""

import os
from pathlib import Path

from engine.io import qemu
from plugins.lab.engine import ovf
from plugins.lab.engine.api import Fault
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.records import (
    BACKUP_ACTIVE,
    SNAPSHOT_CREATED,
    SNAPSHOT_REMOVE_STARTED,
    SNAPSHOT_REMOVED,
    TRANSFER_DONE,
    Snapshot,
    Volume,
)
from plugins.lab.engine.state import Vm, lab_id


def active_snapshot_id(vm: Vm) -> str:
    """The id of the VM's ``Active VM`` snapshot (the current state, never deletable)."""
    return lab_id("snapshot", f"{vm.name}/active")


def snapshot(a: Activity, vm_id: str, snapshot_id: str) -> Snapshot:
    s = a.snapshots.get(snapshot_id)
    if s is None or s.vm_id != vm_id:
        raise Fault(404, f"Entity not found: snapshot {snapshot_id}", "Not Found")
    return s


def vm_snapshots(a: Activity, vm_id: str) -> list[Snapshot]:
    return [s for s in a.snapshots.values() if s.vm_id == vm_id]


async def create(
    a: Activity,
    vm_id: str,
    description: str | None,
    snapshot_id: str | None,
    disk_ids: list[str] | None,
    persist_memorystate: bool,
) -> Snapshot:
    """Validate as ``CreateSnapshotForVmCommand``, then put an overlay on each disk.

    ``disk_ids`` None snapshots every disk of the VM; ``snapshot_id`` None picks one."""
    async with a._lock:
        vm = a.vm(vm_id)
        if not description:
            raise Fault(400, "[Snapshot [description] required for add]", "Incomplete parameters")
        if snapshot_id is not None and snapshot_id in a.snapshots:
            raise Fault(400, f"[Cannot create Snapshot. Snapshot ID {snapshot_id} exists.]")
        if any(not x.deleting for x in vm_snapshots(a, vm_id)):
            raise Fault(409, "[Cannot create Snapshot. The lab engine keeps one per VM.]")
        if any(b.vm_id == vm_id and b.phase in BACKUP_ACTIVE for b in a.backups.values()):
            raise Fault(409, "[Cannot create Snapshot. The VM is during a backup operation.]")
        attached = [x.disk_id for x in vm.attachments]
        chosen = attached if disk_ids is None else disk_ids
        for d in chosen:
            if d not in attached:
                raise Fault(400, f"[Cannot create Snapshot. Disk {d} is not attached to the VM.]")
        # As CreateSnapshotForVmCommand's DisksFilter: LUN and shareable disks are left out.
        chosen = [d for d in chosen if a.inventory.disks[d].snapable]
        if busy := a._busy_disks() & set(chosen):
            raise Fault(409, f"[Cannot create Snapshot. Disks are locked: {sorted(busy)}]")
        s_id = snapshot_id or a.new_id()
        volumes: dict[str, Volume] = {}
        try:
            for disk_id in chosen:
                disk = a.inventory.disks[disk_id]
                path = a.image(disk)
                volume = Volume(
                    a.new_id(),
                    disk_id,
                    path.with_name(f"{path.name}.{s_id}"),
                    a.active_format(disk),
                )
                await _overlay(path, volume)
                volumes[disk_id] = volume
        except BaseException:
            for volume in volumes.values():  # undo the overlays made so far
                os.replace(volume.path, a.images[volume.disk_id])
            raise
        s = Snapshot(
            id=s_id,
            vm_id=vm_id,
            description=description,
            ovf=ovf.vm_ovf(a.inventory, vm, {d: v.id for d, v in volumes.items()}),
            volumes=volumes,
            persist_memorystate=persist_memorystate,
        )
        a.snapshots[s.id] = s
        return s


async def _overlay(path: Path, volume: Volume) -> None:
    names = await qemu.bitmaps(path) if volume.fmt == "qcow2" else []
    os.replace(path, volume.path)
    try:
        await qemu.create(path, "qcow2", None, backing=volume.path, backing_fmt=volume.fmt)
        for name in names:
            await qemu.bitmap_add(path, name)
    except BaseException:
        os.replace(volume.path, path)
        raise


def advance(a: Activity, s: Snapshot) -> None:
    """One polling step (a GET): locked → ok; a deleted snapshot shows locked once, then goes.

    Raises the 404 when it went."""
    if s.deleting:
        s.polls_while_deleting += 1
        if s.polls_while_deleting > 1:
            del a.snapshots[s.id]
            vm = a.inventory.vms[s.vm_id]
            a.event(SNAPSHOT_REMOVED, f"Snapshot '{s.description}' deleted for VM {vm.name}", vm.id)
            raise Fault(404, f"Entity not found: snapshot {s.id}", "Not Found")
    elif s.status == "locked":
        s.status = "ok"
        vm = a.inventory.vms[s.vm_id]
        a.event(
            SNAPSHOT_CREATED,
            f"Snapshot '{s.description}' creation for VM {vm.name} completed",
            vm.id,
        )


async def delete(a: Activity, s: Snapshot) -> None:
    """Merge the overlays back into the volumes (content unchanged), then mark it deleting.

    Only an ``ok`` snapshot can be removed: one still being created or already being removed
    is ``locked`` and a DELETE of it is a 409, as the engine's ``RemoveSnapshotCommand``
    validation refuses a locked snapshot (a client polls until it is gone: 404)."""
    async with a._lock:
        if s.status != "ok":
            raise Fault(409, f"[Cannot remove Snapshot. Snapshot is {s.status}.]")
        for vm in a.inventory.vms.values():  # a transient attachment (``attach_api``)
            if any(x.snapshot_id == s.id for x in vm.attachments):
                raise Fault(
                    409, f"[Cannot remove Snapshot. A disk of it is attached to VM {vm.name}.]"
                )
        volume_ids = {v.id for v in s.volumes.values()}
        if any(
            t.phase not in TRANSFER_DONE
            and (t.snapshot_volume in volume_ids or t.disk_id in s.volumes)
            for t in a.transfers.values()
        ):
            raise Fault(409, "[Cannot remove Snapshot. Disks are locked by an image transfer.]")
        for volume in s.volumes.values():
            top = a.images[volume.disk_id]
            if volume.fmt == "qcow2":
                base_bitmaps = set(await qemu.bitmaps(volume.path))
                for name in await qemu.bitmaps(top):
                    if name in base_bitmaps:
                        await qemu.qemu_img(
                            "bitmap", "--merge", name, "-b", top, "-F", "qcow2",
                            "-f", "qcow2", volume.path, name,
                        )  # fmt: skip
            await qemu.qemu_img("commit", "-q", "-d", "-f", "qcow2", top)
            os.replace(volume.path, top)
        s.deleting = True
        s.status = "locked"
        vm = a.inventory.vms[s.vm_id]
        a.event(
            SNAPSHOT_REMOVE_STARTED, f"Snapshot '{s.description}' deletion for VM {vm.name}", vm.id
        )
