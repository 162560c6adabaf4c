"""Build backup Sources for named VMs of one engine (what ``tessera backup vm`` uses)."""

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from engine.config.models import DataMoverSection, EngineSection
from engine.core.errors import ConfigError
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
) -> VmSources:
    """One Source per VM name (globs allowed); ConfigError for an unknown VM or flow.

    ``require_quiesce`` (either flow) makes a running VM without a responsive guest agent fail
    at open with a ConfigError, before anything is created, instead of a crash-consistent
    backup.

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
                    client, vm, recovery, dm, datamover, require_quiesce=require_quiesce
                )
                for vm in chosen
            ]
        elif flow == "snapshot-imageio":
            sources = [
                SnapshotImageioSource(client, vm, recovery, require_quiesce=require_quiesce)
                for vm in chosen
            ]
        else:
            sources = [
                OvirtVmSource(client, vm, recovery, require_quiesce=require_quiesce)
                for vm in chosen
            ]
        return VmSources(client, sources)
    except BaseException:
        await client.close()
        raise
