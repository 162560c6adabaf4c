"""Build backup Sources for named VMs of one engine (what ``tessera backup vm`` uses), and
say what they would read without creating anything (``plan_vms``: ``backup vm --dry-run``,
``policies --show-selection``)."""

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from engine.config.models import DataMoverSection, EngineSection
from engine.core.errors import ConfigError
from engine.sources.capabilities import PlannedDisk, VmPlan
from engine.sources.selection import NoDiskSelected, not_selected, selects_disk
from plugins.ovirt.attach import SnapshotAttachSource
from plugins.ovirt.backup import OvirtVmSource
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.datamover import find_datamover
from plugins.ovirt.inventory import VmRef, vms
from plugins.ovirt.snapshot import SnapshotImageioSource

# auto = backup-api (incremental, no snapshot); snapshot-imageio = flow 2 (full reads through a
# VM snapshot, OVF saved); snapshot-attach = flow 3 (the snapshot's disks attached to the
# DataMover and read as local devices: LAN free; needs the config's datamover section).
FLOWS = ("auto", "backup-api", "snapshot-imageio", "snapshot-attach")
AUTO_FLOW = "backup-api"  # what ``auto`` runs
NOT_INCREMENTAL = "full: the disk's backup mode is not incremental (no checkpoints)"
SNAPSHOT_READ = "full: a snapshot flow reads every allocated block (no checkpoints)"
Source = OvirtVmSource | SnapshotImageioSource | SnapshotAttachSource


@dataclass
class VmSources:
    """``engine.sources.capabilities.VmSet``: the sources share ``client``; ``aclose``
    closes it after the last backup."""

    client: EngineClient
    sources: list[Source]

    async def aclose(self) -> None:
        await self.client.close()


async def vm_sources(
    engine: EngineSection,
    names: Sequence[str],
    flow: str = "auto",
    *,
    require_quiesce: bool = False,
    datamover: DataMoverSection | None = None,
    api_gate: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    disks: Sequence[str] = (),
) -> VmSources:
    """One Source per VM name (globs allowed); ConfigError for an unknown VM or flow.

    ``require_quiesce`` (either flow) makes a running VM without a responsive guest agent fail
    at open with a ConfigError, before anything is created, instead of a crash-consistent
    backup.

    ``disks`` (names/globs of disk aliases, or disk ids; empty: all) limits the disks each
    VM's backup reads; the others are skipped as ``not selected``, and a VM none of whose
    disks they take fails at open (``NoDiskSelected``), before anything is created.

    ``datamover`` (the configuration's section) is needed by ``snapshot-attach``: the DataMover
    VM is looked up once here (``DataMoverNotFound``, a ConfigError, before anything is made)."""
    if flow not in FLOWS:
        raise ConfigError(message=f"flow {flow!r} is not available yet; use one of {FLOWS}")
    config = EngineConfig.from_section(engine, gate=api_gate)
    client = EngineClient(config)
    try:
        chosen: list[VmRef] = []
        for name in names:
            found = await vms(client, name_glob=name)
            if not found:
                raise ConfigError(message=f"engine {engine.name}: no VM matches {name!r}")
            chosen += [vm for vm in found if vm.id not in {c.id for c in chosen}]
        recovery = EngineConfig.from_section(engine).record()
        sources: list[Source]
        if flow == "snapshot-attach":
            dm = await find_datamover(client, datamover)
            assert datamover is not None  # find_datamover refused None
            sources = [
                SnapshotAttachSource(
                    client,
                    vm,
                    recovery,
                    dm,
                    datamover,
                    require_quiesce=require_quiesce,
                    disks=disks,
                )
                for vm in chosen
            ]
        elif flow == "snapshot-imageio":
            sources = [
                SnapshotImageioSource(
                    client, vm, recovery, require_quiesce=require_quiesce, disks=disks
                )
                for vm in chosen
            ]
        else:
            sources = [
                OvirtVmSource(client, vm, recovery, require_quiesce=require_quiesce, disks=disks)
                for vm in chosen
            ]
        return VmSources(client, sources)
    except BaseException:
        await client.close()
        raise


async def plan_vms(
    engine: EngineSection,
    names: Sequence[str],
    flow: str = "auto",
    *,
    require_quiesce: bool = False,
    datamover: DataMoverSection | None = None,
    api_gate: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    disks: Sequence[str] = (),
) -> list[VmPlan]:
    """What ``vm_sources`` with the same arguments would back up: the same sources are
    built (VMs found, flow checked, the DataMover looked up for ``snapshot-attach``), then
    each is asked only what it reads before it creates anything (``readable_disks``, and
    ``facts``: a GET of the VM's configuration). Raises what ``vm_sources`` raises; a VM
    ``require_quiesce`` refuses, or none of whose disks ``disks`` takes, gets the refusal
    as its ``problem``."""
    found = await vm_sources(
        engine, names, flow, require_quiesce=require_quiesce, datamover=datamover,
        api_gate=api_gate, disks=disks,
    )  # fmt: skip
    try:
        return [
            await _plan(source, AUTO_FLOW if flow == "auto" else flow) for source in found.sources
        ]
    finally:
        await found.aclose()


async def _plan(source: Source, flow: str) -> VmPlan:
    problem = None
    try:
        disks, skipped = source.readable_disks()
    except NoDiskSelected as e:  # the disk selection takes none of its disks
        disks, problem = [], str(e)
        skipped = tuple((d.name, not_selected(source.disks)) for d in source.vm.disks)
    inactive = tuple(
        (d.name, "not active (unplugged): left out")
        for d in source.vm.disks
        if d.skip_reason is None and not d.active and selects_disk(source.disks, d.name, d.id)
    )
    try:
        _, consistency = await source.facts()
    except ConfigError as e:  # require_quiesce refused it
        consistency, problem = "crash", problem or str(e)

    def read(incremental: bool) -> str:
        if flow != AUTO_FLOW:
            return SNAPSHOT_READ
        return "incremental" if incremental else NOT_INCREMENTAL

    vm = source.vm
    return VmPlan(
        vm_id=vm.id,
        vm_name=vm.name,
        cluster=vm.cluster,
        status=vm.status,
        flow=flow,
        disks=tuple(
            PlannedDisk(d.id, d.name, d.provisioned_size, read(d.incremental)) for d in disks
        ),
        skipped=skipped + inactive,
        consistency=consistency,
        problem=problem,
    )
