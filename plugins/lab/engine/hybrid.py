"""Hybrid (snapshot-based) backups of the fake engine (API-NOTES § 4.1, § 4.6).

On a cluster of level ≥ 4.7 (``Seed.cluster_levels``, ``compat_version``) with
``Seed.use_hybrid_backup`` (engine-config ``UseHybridBackup``, true there by default as in the
real engine) a ``POST vms/{vm}/backups`` without ``?legacy=true`` runs the engine's
``HybridBackup`` instead of a live (or, for a down VM, cold) backup; clusters ≤ 4.6 get live
backups. A VM with user snapshots gets its hybrid snapshot on top of them (``snapshots``):

- ``take_snapshot`` (at start, after the new checkpoint's bitmaps were added): a VM snapshot
  "Auto-generated for Backup VM" of the backup's disks, made like any lab snapshot
  (``snapshots``: each disk's top becomes a read-only volume carrying the bitmaps, a qcow2
  overlay takes the writes). It is ``ok`` at once and listed with the VM's snapshots; the
  backup shows it as ``<snapshot id>``. The phases stay initializing → starting → ready.
- image transfers of the backup serve the snapshot's volumes (``volume``), so they read the
  disks as they were when the backup started, whatever the VM writes meanwhile.
- ``remove_snapshot`` (at finalize, also of a failed backup): the overlays are merged back
  (``snapshots.delete``: bitmaps merged, data committed); the backup then shows
  ``finalizing`` for one more step (the engine's REMOVING_SNAPSHOT, ``monitor``), the
  snapshot is gone (event 356) and the backup ``succeeded``.

``Activity.hybrid`` maps each hybrid backup's id to its snapshot id.
"""

import os

from plugins.lab.engine import ovf, snapshots
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.records import (
    SNAPSHOT_CREATED,
    SNAPSHOT_REMOVED,
    Backup,
    Snapshot,
    Volume,
)
from plugins.lab.engine.state import Disk, Vm

DESCRIPTION = "Auto-generated for Backup VM"  # BACKUP_VM_AUTO_GENERATED_SNAPSHOT_DESCRIPTION
HYBRID_LEVEL = (4, 7)  # the first cluster level whose UseHybridBackup is true


def applies(a: Activity, vm: Vm, legacy: bool) -> bool:
    """Whether a backup of ``vm`` is hybrid: the engine setting, the level, no ``legacy``."""
    cluster = a.inventory.clusters[vm.cluster_id]
    return a.inventory.use_hybrid_backup and cluster.version >= HYBRID_LEVEL and not legacy


async def take_snapshot(a: Activity, vm: Vm, disks: list[Disk], backup_id: str) -> Snapshot:
    """Snapshot ``disks`` of ``vm`` for the backup; the caller holds ``a._lock``."""
    s_id = a.new_id()
    volumes: dict[str, Volume] = {}
    try:
        for disk in disks:
            if disk.id not in a.images:  # a lab engine without images for some disks
                continue
            path = a.images[disk.id]
            volume = Volume(
                a.new_id(), disk.id, path.with_name(f"{path.name}.{s_id}"), a.active_format(disk)
            )
            await snapshots._overlay(path, volume)  # made as every lab snapshot is
            volumes[disk.id] = volume
    except BaseException:
        for volume in volumes.values():  # undo the overlays made so far
            os.replace(volume.path, a.images[volume.disk_id])
        raise
    s = Snapshot(
        id=s_id,
        vm_id=vm.id,
        description=DESCRIPTION,
        ovf=ovf.vm_ovf(a.inventory, vm, {d: v.id for d, v in volumes.items()}),
        volumes=volumes,
        status="ok",
    )
    a.snapshots[s.id] = s
    a.hybrid[backup_id] = s.id
    a.event(
        SNAPSHOT_CREATED, f"Snapshot '{DESCRIPTION}' creation for VM {vm.name} completed", vm.id
    )
    return s


def volume(a: Activity, b: Backup, disk_id: str) -> Volume | None:
    """The snapshot volume a transfer of hybrid backup ``b`` serves (None: not hybrid)."""
    s_id = a.hybrid.get(b.id)
    return a.snapshots[s_id].volumes.get(disk_id) if s_id in a.snapshots else None


async def remove_snapshot(a: Activity, b: Backup) -> None:
    """Finalize of hybrid backup ``b``: merge its snapshot back (``snapshots.delete``)."""
    s_id = a.hybrid.get(b.id)
    if s_id is not None and s_id in a.snapshots:
        await snapshots.delete(a, a.snapshots[s_id])
        if b.phase != "finalizing":  # failed (finalized before ready): no step will follow
            removing(a, b)


def removing(a: Activity, b: Backup) -> bool:
    """One step (``monitor``) of a finalizing hybrid backup: True while its snapshot still
    had to go (the backup stays ``finalizing``); the snapshot is forgotten then (event 356)."""
    s_id = a.hybrid.get(b.id)
    if s_id is None or s_id not in a.snapshots:
        return False
    s = a.snapshots.pop(s_id)
    vm = a.inventory.vms[s.vm_id]
    a.event(SNAPSHOT_REMOVED, f"Snapshot '{s.description}' deleted for VM {vm.name}", vm.id)
    return True
