"""Restores, from a typed request to a typed outcome: the one path for ``tessera restore`` run
in this process and for the daemon's restore jobs.

::

    VmRestoreRequest(snapshot, name, cluster, storage_domain, flow, engine, disk, into_vm)
        plan_vm_restore(target, request)   the snapshot resolved, its disks chosen, the new
                                           name; ConfigError/NotFound before anything runs
        restore_vm(config, target, plan, progress=…, api_gate=…, job_id=…)
              the engine's hypervisor plugin's ``vm_restore`` with the snapshot's stored
              OVF (a new VM, or disks attached to ``into_vm``)
              → ``engine.jobs.restore.run_restore`` (``limits.restore_disks`` disks at
              once) → on success the VM is created
        → ``VmRestoreOutcome``: the job's ``RestoreOutcome`` and the VM (None unless it
          succeeded)

    ImageRestoreRequest(snapshot, to, disk, image_format, disks_at_once)
        restore_images(target, request, progress=…)   disks written as local image files,
                                                      ``disks_at_once`` of them at once

A failed restore is an outcome (its record says FAILED; the plugin deleted what it created),
never an exception; a target the engine cannot take (no such cluster or storage domain, one
not active or without room, the new name in use) is found before the job starts and raised
as one ``ConfigError`` listing every problem, nothing created.
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.app.requests import RESTORE_FLOWS, ImageRestoreRequest, VmRestoreRequest
from engine.app.stores import JobStore
from engine.core.errors import ConfigError
from engine.jobs.restore import (
    Progress,
    RestoreOutcome,
    read_vm_config,
    run_restore,
    select_disks,
)
from engine.jobs.states import State
from engine.sources import registry
from engine.sources.capabilities import ApiGate
from engine.sources.types import ResourceRecorder
from engine.store.manifest import DiskEntry, Manifest

if TYPE_CHECKING:  # a local backup or restore reads no configuration (issue 15)
    from engine.config.models import Config


@dataclass(frozen=True, slots=True)
class VmRestorePlan:
    request: VmRestoreRequest
    snapshot_id: str
    manifest: Manifest
    disks: tuple[DiskEntry, ...]
    new_name: str

    def transfer_needs(self, disks_at_once: int) -> dict[str, int]:
        """Image transfers the restore may hold open at once per storage domain (the
        daemon's limits): one per disk, at most ``disks_at_once`` of them."""
        domains = Counter(
            self.request.storage_domain or d.attributes.get("storage_domain_id") or "default"
            for d in self.disks
        )
        return {f"transfers/sd/{sd}": min(n, disks_at_once) for sd, n in domains.items()}


@dataclass(frozen=True, slots=True)
class RestoredVm:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class VmRestoreOutcome:
    restore: RestoreOutcome
    vm: RestoredVm | None  # set when the restore succeeded

    @property
    def succeeded(self) -> bool:
        return self.restore.record.state is State.SUCCEEDED


def plan_vm_restore(target: JobStore, request: VmRestoreRequest) -> VmRestorePlan:
    """Resolve the snapshot and choose its disks; raises before anything runs."""
    if request.flow not in RESTORE_FLOWS:
        raise ConfigError(
            message=f"restore flow {request.flow!r} is unknown; use one of {RESTORE_FLOWS}"
        )
    if request.disk and not request.into_vm:
        raise ConfigError(message="restore: a single disk into the engine needs into_vm")
    snapshot_id = target.store.resolve(request.snapshot)
    manifest = target.store.manifest(snapshot_id)
    chosen = select_disks(manifest, request.disk)  # ConfigError naming an unknown disk
    new_name = request.into_vm or request.name or f"{manifest.vm_name}-restored"
    return VmRestorePlan(request, snapshot_id, manifest, tuple(chosen), new_name)


async def restore_vm(
    config: "Config",
    target: JobStore,
    plan: VmRestorePlan,
    *,
    progress: Progress | None = None,
    api_gate: ApiGate | None = None,
    job_id: str | None = None,
) -> VmRestoreOutcome:
    """Run the planned restore into the engine (module docstring)."""
    request = plan.request
    engine = config.engine(request.engine)
    plugin, hypervisor = registry.hypervisor(engine)
    ovf = await read_vm_config(target.store, plan.manifest)
    async with hypervisor.vm_restore(
        engine,
        plan.manifest,
        ovf,
        name=request.name,
        cluster=request.cluster,
        storage_domain=request.storage_domain,
        flow=request.flow,
        datamover=config.datamover,
        into_vm=request.into_vm,
        disk=request.disk,
        api_gate=api_gate,
    ) as vm_restore:
        outcome = await run_restore(
            store=target.store,
            pool=target.pool,
            snapshot_id=plan.snapshot_id,
            disks=[request.disk] if request.disk else None,
            plugin=plugin,
            make_target=vm_restore.make_target,
            journal=target.journal,
            disks_at_once=config.limits.restore_disks,
            progress=progress,
            finish=vm_restore.create_vm,
            job_id=job_id,
        )
        vm = vm_restore.vm
    restored = None
    if outcome.record.state is State.SUCCEEDED and vm is not None:
        restored = RestoredVm(vm.id, vm.name)
    return VmRestoreOutcome(outcome, restored)


async def restore_images(
    target: JobStore, request: ImageRestoreRequest, *, progress: Progress | None = None
) -> RestoreOutcome:
    """Write the snapshot's disks (or one) as image files under ``request.to``."""
    plugin, images = registry.images()
    snapshot_id = target.store.resolve(request.snapshot)
    manifest = target.store.manifest(snapshot_id)
    entries = select_disks(manifest, request.disk)
    single = len(entries) == 1 and not request.to.is_dir()

    def target_path(entry: DiskEntry) -> Path:
        if single:
            return request.to
        source_format = entry.attributes.get("format", "qcow2")
        fmt = request.image_format or {"cow": "qcow2"}.get(source_format, source_format)
        return request.to / f"{Path(entry.name).stem}.{fmt}"

    def make_target(entry: DiskEntry, record: ResourceRecorder) -> Any:
        return images.image_target(target_path(entry), entry, record, request.image_format)

    return await run_restore(
        store=target.store,
        pool=target.pool,
        snapshot_id=snapshot_id,
        disks=[e.disk_id for e in entries],
        plugin=plugin,
        make_target=make_target,
        journal=target.journal,
        disks_at_once=request.disks_at_once,
        progress=progress,
    )
