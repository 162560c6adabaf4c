"""Build backup Sources for named VMs of one engine (what ``tessera backup vm`` uses)."""

from collections.abc import Sequence
from dataclasses import dataclass

from engine.config.models import EngineSection
from engine.core.errors import ConfigError
from plugins.ovirt.backup import OvirtVmSource
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.inventory import VmRef, vms

FLOWS = ("auto", "backup-api")  # snapshot-imageio and snapshot-attach come next


@dataclass
class VmSources:
    client: EngineClient  # the caller closes it
    sources: list[OvirtVmSource]


async def vm_sources(engine: EngineSection, names: Sequence[str], flow: str = "auto") -> VmSources:
    """One Source per VM name (globs allowed); ConfigError for an unknown VM or flow."""
    if flow not in FLOWS:
        raise ConfigError(message=f"flow {flow!r} is not available yet; use one of {FLOWS}")
    config = EngineConfig(
        url=engine.url,
        username=engine.username,
        password_file=engine.password_file,
        ca_file=engine.ca_file,
    )
    client = EngineClient(config)
    try:
        chosen: list[VmRef] = []
        for name in names:
            found = await vms(client, name_glob=name)
            if not found:
                raise ConfigError(message=f"engine {engine.name}: no VM matches {name!r}")
            chosen += [vm for vm in found if vm.id not in {c.id for c in chosen}]
        recovery = {
            "url": engine.url,
            "username": engine.username,
            "password_file": str(engine.password_file),
            "ca_file": str(engine.ca_file) if engine.ca_file else None,
        }
        return VmSources(client, [OvirtVmSource(client, vm, recovery) for vm in chosen])
    except BaseException:
        await client.close()
        raise
