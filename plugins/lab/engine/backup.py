"""The fake engine's mutable side: backups, checkpoints, image transfers and events.

``Activity`` holds every object the backup API creates and does the real disk work:

- a backup's checkpoint is a persistent qcow2 bitmap named by the checkpoint id, added to each
  qcow2 disk (``DiskSeed.backup == "incremental"``) with ``qemu-img bitmap --add`` when the
  backup starts; raw disks get none, and a backup of raw disks only has no checkpoint;
- image transfers (qemu-nbd exports behind imageio tickets) are ``transfers``'s work on
  ``Activity.transfers``; snapshots themselves (qcow2 overlays) are ``snapshots``'s work on
  ``Activity.snapshots``. A VM with snapshots is backed up from its active layer (the
  export reads through the chain); each overlay carries a copy of the bitmaps below it, so
  the top layer's bitmap is the checkpoint's whole change set, and a checkpoint is removed
  from every layer of the chain (``chain``). A raw disk's active layer under a snapshot is
  its qcow2 overlay (``active_format``).

Backups of a VM in a cluster of level ≥ 4.7 are **hybrid**, as the real engine's default
``UseHybridBackup`` makes them (API-NOTES § 4.1; ``hybrid``: a snapshot per backup, made
through the ``snapshot`` callback of ``start_backup``); on levels ≤ 4.6, with
``?legacy=true`` or ``Seed.use_hybrid_backup=False`` they are **live**, without a snapshot.
Phases move with time, as the engine's own background work moves them, whether a client
polls or not: ``monitor`` calls ``advance_backup`` once a phase is ``Faults.phase_seconds``
old (backup initializing → starting → ready, finalize → finalizing → succeeded). A down
VM's checkpoint delete finishes later in the same way (``finish_checkpoint_delete``):
listed ``invalid`` until then.

``restart_vm`` restarts a running VM; with ``redefine_fails`` its next incremental backup
loses the VM's checkpoint chain as the real engine's does (events 10791 and 10792).

``faults`` (the ``Faults`` knobs) adds: a backup of a VM in ``fail_backup_of`` goes
initializing → failed with event 10792; with ``pause_transfers`` every new transfer pauses.

Errors raise ``api.Fault`` with the engine's status and text. Every method runs on the event
loop; one lock serializes the mutating ones (they await qemu-img / qemu-nbd / imageio).
``close()`` stops every qemu-nbd and removes every ticket; the ``ImageioDaemon`` itself
belongs to the caller.
"""

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.io import qemu
from plugins.lab.engine.api import Fault
from plugins.lab.engine.clock import Clock, SystemClock, elapsed
from plugins.lab.engine.faults import Faults
from plugins.lab.engine.records import (
    BACKUP_ACTIVE,
    TRANSFER_DONE,
    VM_BACKUP_FAILED,
    VM_BACKUP_FINALIZED,
    VM_BACKUP_STARTED,
    VM_BACKUP_SUCCEEDED,
    VM_CHECKPOINT_DELETED,
    VM_INCREMENTAL_BACKUP_FAILED_FULL_VM_BACKUP_NEEDED,
    Backup,
    Checkpoint,
    Event,
    Snapshot,
    Transfer,
    now,
)
from plugins.lab.engine.state import Disk, Inventory, Vm
from plugins.lab.imageio import ImageioDaemon


@dataclass(slots=True)
class Activity:
    """All backups, checkpoints, transfers and events of one fake engine (module docstring)."""

    inventory: Inventory
    images: dict[str, Path]  # disk id → image file (qcow2 for "cow" disks, else raw)
    imageio: ImageioDaemon | None
    # Where ``POST disks`` creates images (``restore``); None: the engine creates no disks.
    images_dir: Path | None = None
    created_images: set[str] = field(default_factory=set)  # disk ids whose image we made
    # Block volumes (``volumes``): image file → its allocation; writable exports stop there.
    volume_sizes: dict[Path, int] = field(default_factory=dict)
    backups: dict[str, Backup] = field(default_factory=dict)
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)  # creation order
    transfers: dict[str, Transfer] = field(default_factory=dict)
    snapshots: dict[str, Snapshot] = field(default_factory=dict)  # see ``snapshots``
    events: list[Event] = field(default_factory=list)
    extends: dict[str, int] = field(default_factory=dict)  # transfer id → extend actions
    hybrid: dict[str, str] = field(default_factory=dict)  # hybrid backup id → its snapshot id
    # Checkpoints of a down VM being deleted → ``clock.now()`` at the DELETE: shown
    # ``invalid`` until ``monitor`` finishes the delete (then 404).
    deleting_checkpoints: dict[str, float] = field(default_factory=dict)
    # Disks ``POST disks`` created → ``clock.now()`` then: ``locked`` until ``monitor``
    # finishes them ``Faults.disk_seconds`` later (``restore.finish_disk``).
    creating_disks: dict[str, float] = field(default_factory=dict)
    # VMs restarted since their last backup whose libvirt checkpoints cannot be redefined
    # (``restart_vm(redefine_fails=True)``): their next incremental loses the chain.
    broken_redefine: set[str] = field(default_factory=set)
    faults: Faults = field(default_factory=Faults)  # the test's knobs (``faults`` module)
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    clock: Clock = field(default_factory=SystemClock)  # every age ``monitor`` compares
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def due(self, since: float, seconds: float | None = None) -> bool:
        """Whether ``seconds`` (default ``Faults.phase_seconds``) have passed on the clock
        since ``since`` (a ``clock.now()`` reading): the engine's next step is due."""
        step = self.faults.phase_seconds if seconds is None else seconds
        return elapsed(self.clock.now(), since, step)

    # -- lookups -----------------------------------------------------------------------------

    def vm(self, vm_id: str) -> Vm:
        try:
            return self.inventory.vms[vm_id]
        except KeyError:
            raise Fault(404, f"Entity not found: VM {vm_id}", "Not Found") from None

    def backup(self, vm_id: str, backup_id: str) -> Backup:
        b = self.backups.get(backup_id)
        if b is None or b.vm_id != vm_id:
            raise Fault(404, f"Entity not found: backup {backup_id}", "Not Found")
        return b

    def checkpoint(self, vm_id: str, checkpoint_id: str) -> Checkpoint:
        c = self.checkpoints.get(checkpoint_id)
        if c is None or c.vm_id != vm_id:
            raise Fault(404, f"Entity not found: checkpoint {checkpoint_id}", "Not Found")
        return c

    def transfer(self, transfer_id: str) -> Transfer:
        try:
            return self.transfers[transfer_id]
        except KeyError:
            raise Fault(
                404, f"Entity not found: image transfer {transfer_id}", "Not Found"
            ) from None

    def vm_checkpoints(self, vm_id: str) -> list[Checkpoint]:
        return [c for c in self.checkpoints.values() if c.vm_id == vm_id]

    def image(self, disk: Disk) -> Path:
        path = self.images.get(disk.id)
        if path is None:
            raise Fault(409, f"[Cannot transfer Virtual Disk. Disk {disk.alias} has no image.]")
        return path

    def active_format(self, disk: Disk) -> str:
        """The format of the disk's active layer: a snapshot puts a qcow2 overlay on top."""
        snapped = any(disk.id in s.volumes and not s.deleting for s in self.snapshots.values())
        return "qcow2" if disk.format == "cow" or snapped else "raw"

    def _busy_disks(self) -> set[str]:
        return {t.disk_id for t in self.transfers.values() if t.phase not in TRANSFER_DONE}

    def event(
        self, code: int, description: str, vm_id: str | None, severity: str = "normal"
    ) -> None:
        self.events.append(Event(len(self.events) + 1, code, severity, description, vm_id))

    # -- backups -----------------------------------------------------------------------------

    async def start_backup(
        self,
        vm_id: str,
        disk_ids: list[str],
        from_checkpoint_id: str | None,
        backup_id: str | None,
        description: str | None,
        snapshot: Callable[[Vm, list[Disk], str], Awaitable[object]] | None = None,
    ) -> Backup:
        """Validate as ``StartVmBackupCommand`` does, add the bitmaps, record the backup.

        ``snapshot(vm, disks, backup_id)`` (a hybrid backup, ``hybrid.take_snapshot``) runs
        under the lock once the bitmaps are in place, unless the backup is set to fail."""
        async with self._lock:
            vm = self.vm(vm_id)
            if vm.status not in ("up", "down"):
                raise Fault(409, "[Cannot backup VM. The VM should be in Up or Down status.]")
            if not disk_ids:
                raise Fault(400, "[Cannot backup VM. The backup must include disks.]")
            attached = {a.disk_id for a in vm.attachments if a.active}
            for d in disk_ids:
                if d not in attached:
                    raise Fault(
                        409, f"[Cannot backup VM. Disk {d} is not an active disk of the VM.]"
                    )
            if any(b.vm_id == vm_id and b.phase in BACKUP_ACTIVE for b in self.backups.values()):
                raise Fault(409, "[Cannot backup VM. The VM is during a backup operation.]")
            if from_checkpoint_id is not None:
                self._check_from(vm_id, from_checkpoint_id)
            # StartVmBackupCommand.getDisks: shareable and LUN (not snapable) disks are
            # silently filtered out (API-NOTES § 4.2); the backup's disks list shows the rest.
            disk_ids = [d for d in disk_ids if self.inventory.disks[d].snapable]
            if not disk_ids:
                raise Fault(400, "[Cannot backup VM. The backup must include disks.]")
            chain_lost = from_checkpoint_id is not None and vm_id in self.broken_redefine
            if chain_lost:
                # RedefineVmCheckpointCommand failed: the engine removes the VM's whole
                # chain, accepts the backup and fails it (API-NOTES § 4.8, event 10791).
                await self._drop_chain(vm_id)
            self.broken_redefine.discard(vm_id)
            if backup_id is not None and backup_id in self.backups:
                raise Fault(400, f"[Cannot backup VM. Backup ID {backup_id} already exists.]")
            if busy := self._busy_disks() & set(disk_ids):
                raise Fault(409, f"[Cannot backup VM. Disks are locked: {', '.join(sorted(busy))}]")
            disks = [self.inventory.disks[d] for d in dict.fromkeys(disk_ids)]
            modes = {
                d.id: "full" if chain_lost else await self._mode(d, from_checkpoint_id)
                for d in disks
            }
            failure = None
            if chain_lost:
                failure = "redefining the checkpoints of the VM failed; the chain was removed"
            elif vm.name in self.faults.fail_backup_of:
                self.faults.fail_backup_of.discard(vm.name)
                failure = "lab fault injected by Faults.fail_backup_of"
            tracked = [
                d
                for d in disks
                if d.format == "cow" and d.backup == "incremental" and failure is None
            ]
            to_checkpoint = None
            if tracked:
                to_checkpoint = self.new_id()
                for disk in tracked:
                    await self._bitmap(qemu.bitmap_add, disk, to_checkpoint)
                leaf = [
                    c for c in self.vm_checkpoints(vm_id) if c.id not in self.deleting_checkpoints
                ]
                self.checkpoints[to_checkpoint] = Checkpoint(
                    to_checkpoint,
                    vm_id,
                    leaf[-1].id if leaf else None,
                    tuple(d.id for d in tracked),
                    description,
                )
            b_id = backup_id or self.new_id()
            if snapshot is not None and failure is None:
                await snapshot(vm, disks, b_id)
            b = Backup(
                id=b_id,
                vm_id=vm_id,
                host_id=vm.host_id,
                disk_ids=tuple(d.id for d in disks),
                modes=modes,
                from_checkpoint_id=from_checkpoint_id,
                to_checkpoint_id=to_checkpoint,
                description=description,
                failure=failure,
                chain_lost=chain_lost,
                since=self.clock.now(),
            )
            self.backups[b.id] = b
            self.event(VM_BACKUP_STARTED, f"Backup {b.id} for VM {vm.name} started", vm_id)
            return b

    def _check_from(self, vm_id: str, from_checkpoint_id: str) -> None:
        c = self.checkpoints.get(from_checkpoint_id)
        if c is None or c.vm_id != vm_id:
            raise Fault(
                400, f"[Cannot backup VM. Checkpoint ID {from_checkpoint_id} doesn't exist.]"
            )
        if c.id in self.deleting_checkpoints:
            raise Fault(400, f"[Cannot backup VM. Checkpoint ID {c.id} is in invalid state.]")

    async def _mode(self, disk: Disk, from_checkpoint_id: str | None) -> str:
        """``incremental`` only if the from-checkpoint recorded the disk and its bitmap exists."""
        if from_checkpoint_id is None:
            return "full"
        c = self.checkpoints[from_checkpoint_id]
        if disk.id not in c.disk_ids or disk.id not in self.images:
            return "full"
        return "incremental" if from_checkpoint_id in await self._bitmaps(disk) else "full"

    async def _bitmaps(self, disk: Disk) -> list[str]:
        try:
            return await qemu.bitmaps(self.image(disk))
        except qemu.QemuError as e:
            raise Fault(409, f"[Cannot read the bitmaps of disk {disk.alias}: {e}]") from e

    def chain(self, disk: Disk) -> list[Path]:
        """The disk's qcow2 files that can hold bitmaps, top (active layer) first."""
        below = [
            s.volumes[disk.id]
            for s in reversed(self.snapshots.values())
            if disk.id in s.volumes and not s.deleting
        ]
        top = [self.image(disk)] if self.active_format(disk) == "qcow2" else []
        return top + [v.path for v in below if v.fmt == "qcow2"]

    async def _remove_bitmap(self, disk: Disk, name: str) -> None:
        """Remove bitmap ``name`` from every layer of the disk that has it (vdsm does)."""
        if disk.id not in self.images:
            return
        for path in self.chain(disk):
            try:
                if name in await qemu.bitmaps(path):
                    await qemu.bitmap_remove(path, name)
            except qemu.QemuError as e:
                raise Fault(409, f"[Cannot remove bitmap {name} of {disk.alias}: {e}]") from e

    async def _bitmap(
        self, op: Callable[[Path, str], Awaitable[None]], disk: Disk, name: str
    ) -> None:
        path = self.image(disk)
        try:
            await op(path, name)
        except qemu.QemuError as e:
            raise Fault(409, f"[Cannot change bitmap {name} of disk {disk.alias}: {e}]") from e

    def advance_backup(self, b: Backup) -> None:
        """One step of the engine's work (``monitor``): initializing → starting → ready;
        finalizing → succeeded; initializing → failed (event 10792) for a backup
        ``Faults.fail_backup_of`` picked."""
        step = {"initializing": "starting", "starting": "ready", "finalizing": "succeeded"}
        nxt = step.get(b.phase)
        if nxt is None:
            return
        b.since = self.clock.now()
        if b.phase == "initializing" and b.failure is not None:
            b.phase = "failed"
            b.modified = now()
            vm = self.inventory.vms[b.vm_id]
            if b.chain_lost:
                self.event(
                    VM_INCREMENTAL_BACKUP_FAILED_FULL_VM_BACKUP_NEEDED,
                    f"Incremental backup {b.id} for VM {vm.name} failed. Full backup is now needed",
                    vm.id,
                    "error",
                )
            self.event(
                VM_BACKUP_FAILED,
                f"Backup {b.id} for VM {vm.name} failed: {b.failure}",
                vm.id,
                "error",
            )
            return
        b.phase = nxt
        b.modified = now()
        if nxt == "succeeded":
            vm = self.inventory.vms[b.vm_id]
            self.event(VM_BACKUP_SUCCEEDED, f"Backup {b.id} for VM {vm.name} completed", vm.id)

    def finalize_backup(self, b: Backup) -> None:
        if b.phase not in BACKUP_ACTIVE or b.phase == "finalizing":
            raise Fault(
                400,
                f"[Cannot stop VM Backup. Backup {b.id} is already in '{b.phase}' phase, "
                "no need to stop the backup again.]",
            )
        if any(
            t.backup_id == b.id and t.phase not in TRANSFER_DONE for t in self.transfers.values()
        ):
            raise Fault(
                409,
                "[Cannot stop VM Backup. The VM backup has an active image transfer.]",
            )
        failed = b.phase != "ready"
        b.phase = "failed" if failed else "finalizing"
        b.modified = now()
        b.since = self.clock.now()
        vm = self.inventory.vms[b.vm_id]
        if failed:  # finalize before READY fails the backup and drops its checkpoint
            self.checkpoints.pop(b.to_checkpoint_id or "", None)
            self.event(VM_BACKUP_FAILED, f"Backup {b.id} for VM {vm.name} failed", vm.id, "error")
        else:
            self.event(VM_BACKUP_FINALIZED, f"Backup {b.id} for VM {vm.name} finalized", vm.id)

    async def delete_checkpoint(self, c: Checkpoint) -> None:
        """Remove the bitmap from every disk of the checkpoint, re-link the child, forget it.

        A live delete (VM up) is synchronous. A cold one (VM down) finishes later in the real
        engine: here the checkpoint stays listed, ``invalid``, until ``monitor`` finishes it
        ``Faults.phase_seconds`` later (404 then, ``finish_checkpoint_delete``), so a client
        has to poll as SDK-EX ``checkpoints.py`` does."""
        async with self._lock:
            if c.id in self.deleting_checkpoints:
                return
            if any(b.vm_id == c.vm_id and b.phase in BACKUP_ACTIVE for b in self.backups.values()):
                raise Fault(409, "[Cannot remove checkpoint. The VM is during a backup operation.]")
            for disk_id in c.disk_ids:
                await self._remove_bitmap(self.inventory.disks[disk_id], c.id)
            for other in self.checkpoints.values():
                if other.parent_id == c.id:
                    other.parent_id = c.parent_id
            vm = self.inventory.vms[c.vm_id]
            if vm.status == "down":
                self.deleting_checkpoints[c.id] = self.clock.now()
                return
            del self.checkpoints[c.id]
            self.event(VM_CHECKPOINT_DELETED, f"Checkpoint {c.id} for VM {vm.name} deleted", vm.id)

    async def restart_vm(self, vm_id: str, *, redefine_fails: bool) -> None:
        """The VM is restarted (a new qemu process; libvirt forgets its checkpoints).

        The engine redefines the checkpoints in libvirt before the next live backup. With
        ``redefine_fails`` that fails, as it does when the restart left the bitmaps unusable
        (an unclean shutdown marks them in-use/inconsistent; the lab removes them): the
        next backup with ``from_checkpoint_id`` is accepted, the engine drops the VM's whole
        checkpoint chain and the backup fails with events 10791 and 10792; a later backup
        from any old checkpoint is refused (400, it no longer exists)."""
        async with self._lock:
            vm = self.vm(vm_id)
            if vm.status != "up":
                raise Fault(409, f"[Cannot restart VM. VM {vm.name} is {vm.status}.]")
            if redefine_fails:
                for c in self.vm_checkpoints(vm_id):
                    for disk_id in c.disk_ids:
                        await self._remove_bitmap(self.inventory.disks[disk_id], c.id)
                self.broken_redefine.add(vm_id)
            self.event(61, f"VM {vm.name} was restarted.", vm.id)

    async def _drop_chain(self, vm_id: str) -> None:
        """Forget every checkpoint of the VM (and any bitmap still there); caller locks."""
        for c in self.vm_checkpoints(vm_id):
            for disk_id in c.disk_ids:
                await self._remove_bitmap(self.inventory.disks[disk_id], c.id)
            self.checkpoints.pop(c.id, None)
            self.deleting_checkpoints.pop(c.id, None)

    def finish_checkpoint_delete(self, c: Checkpoint) -> None:
        """The engine's background work (``monitor``): a cold delete in progress is done."""
        if self.deleting_checkpoints.pop(c.id, None) is not None:
            del self.checkpoints[c.id]
            vm = self.inventory.vms[c.vm_id]
            self.event(VM_CHECKPOINT_DELETED, f"Checkpoint {c.id} for VM {vm.name} deleted", vm.id)

    # -- image transfers (``transfers`` does the work) ----------------------------------

    async def _release(self, t: Transfer) -> None:
        nbd, t.nbd = t.nbd, None
        try:
            if self.imageio is not None and nbd is not None:
                await self.imageio.remove_ticket(t.ticket)
        finally:
            if nbd is not None:
                await nbd.stop()

    async def close(self) -> None:
        """Remove every ticket and stop every qemu-nbd still running; idempotent."""
        errors: list[BaseException] = []
        for t in self.transfers.values():
            try:
                await self._release(t)
            except Exception as e:  # noqa: BLE001 - stop the others, then report
                errors.append(e)
        if errors:
            raise errors[0]
