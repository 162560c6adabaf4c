"""VM snapshots of the fake engine as qcow2 overlays (API-NOTES § 7, § 11.3, § 11.4).

Each disk is a chain of files, base first: the volumes of the VM's snapshots that include the
disk, in creation order, then the active layer at the image's original path
(``Activity.images``). Creating a snapshot of a VM, for each disk with an image:

- the disk's current top file is **renamed** to ``<image>.<snapshot id>`` (same directory, so
  a relative backing path of a template stays valid; nothing refers to a top file, so the
  rename breaks no backing reference): that is the snapshot's volume, read-only from now on,
  keeping its format (a raw disk's volume stays raw, as in the real engine: raw base + qcow2
  overlay);
- a qcow2 overlay is created **at the image's original path**, backed by that volume
  (``qemu-img create -f qcow2 -b <volume> -F <fmt>``), so ``Activity.images`` and anyone
  writing "the VM's disk" (tests with qemu-io) keep using the same path for the active layer;
- every bitmap of the volume is **copied** into the overlay (``qemu-img bitmap --add --merge
  NAME -b <volume>``), enabled, as vdsm and libvirt do: the top layer's bitmap then holds
  every change since its checkpoint, made before or after the snapshot, so an incremental
  backup (``qemu-nbd --bitmap``, which reads the topmost node holding the bitmap) reads
  exactly the changed blocks. Checkpoints made later live in the top layer only.

Deleting a snapshot merges its volume's child (the next snapshot's volume of that disk, or
the active layer) into the volume: the child is committed into the volume (``qemu-img
commit -d``), each bitmap of the child is merged into the volume's bitmap of the same name
(added after the commit where the volume has none, so a checkpoint made after the snapshot
survives with its own change set) and the volume is renamed to the child's path: the content
the VM (and any later snapshot) sees is unchanged and checkpoints stay usable. A raw base
that takes a qcow2 child's place makes the layer above it rebase (``qemu-img rebase -u``).

A VM may have several snapshots. No snapshot during a backup (409, as the engine); a VM with
snapshots is backed up from its active layer (``backup``). No preview/restore. Phases move
with time, whoever polls (``step``, run by ``monitor`` as the engine's command callbacks
run): created ``locked``, ``ok`` ``Faults.phase_seconds`` later; after ``DELETE`` (the merge
runs at once) the snapshot shows ``locked`` for ``Faults.phase_seconds``, then is gone
(404). While a snapshot is ``locked`` its disks are too, as the engine locks their images
(no transfer, no other snapshot of them meanwhile). A hybrid backup's snapshot goes with
its backup instead (``hybrid.removing``). A ``DELETE`` of a ``locked`` snapshot (being
created or already being removed) is a 409 ``Snapshot is locked``. The list also shows the
VM's ``Active VM`` snapshot (type ``active``), as the real engine does; it cannot be
deleted. ``seed`` makes the snapshots a seed names (``VmSeed.snapshots``) when the engine
starts.
"""

import asyncio
import os
from dataclasses import replace
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
        if any(b.vm_id == vm_id and b.phase in BACKUP_ACTIVE for b in a.backups.values()):
            raise Fault(409, "[Cannot create Snapshot. The VM is during a backup operation.]")
        attached = [x.disk_id for x in vm.attachments]
        chosen = attached if disk_ids is None else disk_ids
        for d in chosen:
            if d not in attached:
                raise Fault(400, f"[Cannot create Snapshot. Disk {d} is not attached to the VM.]")
        # As CreateSnapshotForVmCommand's DisksFilter: LUN and shareable disks are left out.
        chosen = [d for d in chosen if a.inventory.disks[d].snapable]
        locked = {d for d in chosen if a.inventory.disks[d].status == "locked"}
        if busy := (a._busy_disks() | locked) & set(chosen):
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
            since=a.clock.now(),
        )
        a.snapshots[s.id] = s
        _disks_status(a, s, "locked")
        return s


async def _overlay(path: Path, volume: Volume) -> None:
    names = await qemu.bitmaps(path) if volume.fmt == "qcow2" else []
    os.replace(path, volume.path)
    try:
        await qemu.create(path, "qcow2", None, backing=volume.path, backing_fmt=volume.fmt)
        for name in names:  # copied, contents included (module docstring)
            await qemu.qemu_img(
                "bitmap", "--add", "--merge", name, "-b", volume.path, "-F", volume.fmt,
                "-f", "qcow2", path, name,
            )  # fmt: skip
    except BaseException:
        os.replace(volume.path, path)
        raise


def _disks_status(a: Activity, s: Snapshot, status: str) -> None:
    """The engine locks the images of a snapshot's disks while it creates or merges it:
    ``locked`` then, ``ok`` again when it is done (an illegal disk stays illegal)."""
    for disk_id in s.volumes:
        disk = a.inventory.disks.get(disk_id)
        if disk is not None and disk.status in ("ok", "locked") and disk.status != status:
            a.inventory.disks[disk_id] = replace(disk, status=status)


def step(a: Activity, s: Snapshot) -> None:
    """One step of the engine's background work (``monitor``, under the activity's lock),
    once the status is ``Faults.phase_seconds`` old: locked → ok; a deleted snapshot goes.
    A hybrid backup's snapshot is left to its backup (``hybrid.removing``)."""
    if not a.due(s.since) or s.id in a.hybrid.values():
        return
    if s.deleting:
        del a.snapshots[s.id]
        _disks_status(a, s, "ok")
        vm = a.inventory.vms[s.vm_id]
        a.event(SNAPSHOT_REMOVED, f"Snapshot '{s.description}' deleted for VM {vm.name}", vm.id)
    elif s.status == "locked":
        s.status = "ok"
        s.since = a.clock.now()
        _disks_status(a, s, "ok")
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
            above = _above(a, s, volume.disk_id)
            child = above.volumes[volume.disk_id].path if above else a.images[volume.disk_id]
            # Commit first: it dirties the volume's enabled bitmaps with every block it
            # copies, right for those (older than the snapshot) but not for a checkpoint
            # made after the snapshot, which is added to the volume only then.
            await qemu.qemu_img("commit", "-q", "-d", "-f", "qcow2", child)
            if volume.fmt == "qcow2":
                base_bitmaps = set(await qemu.bitmaps(volume.path))
                for name in await qemu.bitmaps(child):
                    if name not in base_bitmaps:  # a checkpoint made after the snapshot
                        await qemu.bitmap_add(volume.path, name)
                    await qemu.qemu_img(
                        "bitmap", "--merge", name, "-b", child, "-F", "qcow2",
                        "-f", "qcow2", volume.path, name,
                    )  # fmt: skip
            os.replace(volume.path, child)
            if above is not None and volume.fmt != "qcow2":
                # A raw base took the place of the next snapshot's qcow2 volume: the layer
                # above that now has a raw backing file (vdsm rebases it likewise).
                merged = replace(above.volumes[volume.disk_id], fmt=volume.fmt)
                above.volumes[volume.disk_id] = merged
                top = _above(a, above, volume.disk_id)
                path = top.volumes[volume.disk_id].path if top else a.images[volume.disk_id]
                await qemu.qemu_img(
                    "rebase", "-u", "-f", "qcow2", "-b", child, "-F", volume.fmt, path
                )
        s.deleting = True
        s.status = "locked"
        s.since = a.clock.now()
        if s.id not in a.hybrid.values():  # a hybrid backup's merge is its backup's
            _disks_status(a, s, "locked")
        vm = a.inventory.vms[s.vm_id]
        a.event(
            SNAPSHOT_REMOVE_STARTED, f"Snapshot '{s.description}' deletion for VM {vm.name}", vm.id
        )


def _above(a: Activity, s: Snapshot, disk_id: str) -> Snapshot | None:
    """The next snapshot (in creation order) with a volume of the disk, right above ``s``'s
    volume; None: the active layer (``Activity.images``) is."""
    later = list(a.snapshots)[list(a.snapshots).index(s.id) + 1 :]
    for other in (a.snapshots[x] for x in later):
        if disk_id in other.volumes and not other.deleting:
            return other
    return None


SEEDED_WRITE = "64k"  # what the guest writes after a seeded snapshot, 1 MiB before the end


async def seed(a: Activity) -> None:
    """Make the user snapshots the seed names (``VmSeed.snapshots``), oldest first, for the
    disks with images; after each, the guest writes ``SEEDED_WRITE`` to every disk's active
    layer 1 MiB before its end, so each layer holds something of its own.

    Ids are stable (``lab_id``). A snapshot whose volume files already exist (the images of
    a lab started before) is only recorded."""
    async with a._lock:
        for vm in a.inventory.vms.values():
            for n, description in enumerate(vm.snapshots):
                s_id = lab_id("snapshot", f"{vm.name}/{description}")
                if s_id in a.snapshots:
                    continue
                volumes: dict[str, Volume] = {}
                for disk in a.inventory.vm_disks(vm):
                    if disk.id not in a.images or not disk.snapable:
                        continue
                    path = a.images[disk.id]
                    volume = Volume(
                        lab_id("volume", f"{disk.alias}/{description}"),
                        disk.id,
                        path.with_name(f"{path.name}.{s_id}"),
                        a.active_format(disk),
                    )
                    if not volume.path.exists():
                        await _overlay(path, volume)
                        offset = max(0, disk.provisioned_size - 1024 * 1024)
                        await _guest_write(path, 0x50 + n, offset)
                    volumes[disk.id] = volume
                a.snapshots[s_id] = Snapshot(
                    id=s_id,
                    vm_id=vm.id,
                    description=description,
                    ovf=ovf.vm_ovf(a.inventory, vm, {d: v.id for d, v in volumes.items()}),
                    volumes=volumes,
                    status="ok",
                )


async def _guest_write(path: Path, pattern: int, offset: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {SEEDED_WRITE}", path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        reason = err.decode(errors="replace").strip()
        raise qemu.QemuError(command=f"qemu-io {path}", reason=reason)
