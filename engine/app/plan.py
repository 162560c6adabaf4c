"""What a policy run or a backup would do now, found without doing it: ``policies
--show-selection`` and ``backup vm --dry-run``.

::

    select(selection, listed)            the VMs a policy takes from the hypervisor's list
                                         (the daemon's policy runs choose with it too)
    preview_policy(config, policy)       list_vms → select → the plugin's ``plan_vms``
    plan_backup(config, store, request)  the plugin's ``plan_vms`` → per VM the level and
                                         parent the backup job would choose in ``store``

Both only read: the hypervisor plugin's ``list_vms`` and ``plan_vms`` create nothing on the
engine, and the store is only read (its catalog), so a running daemon that holds it is not
disturbed.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.app.requests import VmBackupRequest
from engine.jobs.backup import choose_parent
from engine.sources import registry
from engine.sources.capabilities import ApiGate, VmPlan
from engine.store.protocols import ChunkReader

if TYPE_CHECKING:
    from engine.config.models import Config
    from engine.config.policy import Policy, Selection


def select(selection: "Selection", listed: Sequence[Mapping[str, Any]]) -> list[str]:
    """The names of the VMs of ``listed`` (``Hypervisor.list_vms`` entries) that
    ``selection`` takes, in the hypervisor's order."""
    return [
        v["name"]
        for v in listed
        if selection.selects_vm(v["name"], v.get("cluster"), v.get("tags", ()))
    ]


@dataclass(frozen=True, slots=True)
class SelectionPreview:
    """A policy's selection resolved now: ``listed`` VMs on its engine, the ``vms`` it
    takes (each as its backup would run, ``VmPlan``)."""

    policy: str
    engine: str
    listed: int
    vms: tuple[VmPlan, ...]


async def preview_policy(
    config: "Config", policy: "Policy", *, api_gate: ApiGate | None = None
) -> SelectionPreview:
    """The VMs ``policy`` would back up if it ran now, each with the flow, the disks it
    would read and skip (``selection.disks`` applied), as the daemon's run would choose
    them (``select``) and the plugin would back them up (``plan_vms``). Raises
    ``ConfigError`` for an unknown engine, a missing DataMover (``snapshot-attach``), and
    the engine's errors."""
    engine = config.engine(policy.selection.engine)
    _, hypervisor = registry.hypervisor(engine)
    listed = await hypervisor.list_vms(engine, api_gate=api_gate)
    chosen = select(policy.selection, listed)
    plans: list[VmPlan] = []
    if chosen:
        plans = await hypervisor.plan_vms(
            engine,
            chosen,
            policy.flow,
            require_quiesce=policy.require_quiesce,
            datamover=config.datamover,
            api_gate=api_gate,
            disks=policy.selection.disks,
        )
    return SelectionPreview(policy.name, engine.name, len(listed), tuple(plans))


@dataclass(frozen=True, slots=True)
class BackupPlan:
    """One VM's backup as it would run now: the hypervisor's ``vm`` plan, the ``level``
    the job would run (``requested`` may differ: a first backup is full), its ``parent``
    snapshot in the store (None: none), and ``note`` (why the level changed)."""

    vm: VmPlan
    requested: str
    level: str
    parent: str | None
    note: str | None


async def plan_backup(
    config: "Config",
    store: ChunkReader,
    request: VmBackupRequest,
    *,
    api_gate: ApiGate | None = None,
) -> list[BackupPlan]:
    """What ``engine.app.backup.backup_vms`` would do for ``request`` into ``store``, one
    plan per VM, creating nothing: the request checked, the VMs, flow and DataMover
    resolved as the backup resolves them, and each VM's level and parent chosen from the
    store's snapshots by the backup job's own rule (``choose_parent``). Raises what
    ``backup_vms`` raises before a backup starts (``ConfigError``: an unknown VM, level or
    flow, no DataMover)."""
    request.check()
    engine = config.engine(request.engine)
    _, hypervisor = registry.hypervisor(engine)
    vms = await hypervisor.plan_vms(
        engine,
        list(request.vms),
        request.flow,
        require_quiesce=request.require_quiesce,
        datamover=config.datamover,
        api_gate=api_gate,
        disks=request.disks,
    )
    plans = []
    for vm in vms:
        level, parent, _, note = choose_parent(store.snapshots(vm.vm_id), request.level)
        plans.append(
            BackupPlan(vm, request.level, level, parent.snapshot_id if parent else None, note)
        )
    return plans
