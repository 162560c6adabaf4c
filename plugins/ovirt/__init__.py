"""The oVirt plugin: the engine's REST API through ``ovirtsdk4``, disk data through imageio.

Nouns, top down (each layer imports only those below it: DESIGN §6, the layers contract):

- ``sources``       picks the backup flow (``auto`` = backup API) and builds one Source per VM;
                    ``plan_vms`` says what those would read, creating nothing.
- ``standby``       the cold standby's targets (``engine.standby``): a full restore as
                    ``<vm><suffix>``, then refreshes uploading changed slots into its disks.
- ``attach_restore`` restore writing new disks through the DataMover (``--flow attach``).
- ``backup``        flow 1, the incremental-backup API (checkpoints, per-disk backup_mode,
                    chain loss turned into a full read in the same run).
- ``snapshot``      flow 2, snapshot + OVF + image transfers (LAN based), quiesce facts.
- ``attach``        flow 3, LAN free: snapshot disks attached to the DataMover VM and read as
                    local devices.
- ``restore``       a snapshot restored into the engine as a new VM (disks uploaded through
                    image transfers, the VM created from the stored OVF), or its disks
                    attached to an existing VM (``into_vm``).
- ``doctor``        the engine section tried for real (``check-config --deep``).
- ``recovery``      what a killed job left on the engine and the DataMover, undone from its
                    journal keys.
- ``transfers``, ``backups``, ``snapshots``, ``disks``, ``datamover``, ``base``,
  ``preflight``:    the middle layer the flows share (image transfers and their lifecycle,
                    the backup API's calls, VM snapshots, disk attach/detach/delete,
                    DataMover devices, what every backup flow reads first, what every
                    restore checks on the engine before it creates anything).
- ``checkpoints``, ``events``, ``imageio`` (the data path: ranged GETs, extents, uploads, on
                    aiohttp), ``inventory`` (typed, frozen snapshots of clusters, hosts,
                    storage domains, VMs and disks), ``volumes`` (disk shapes on block
                    storage), ``idempotent`` (which engine answers mean "already done", and
                    ``Steps``: recovery steps run independently).
- ``EngineClient``  (``client``) one engine, one SSO token, a bounded pool of threads each with
                    its own ``ovirtsdk4.Connection``; every SDK call goes through
                    ``EngineClient.call``; its ``clock`` (``polling``) is what every wait on
                    the engine's objects reads; ``engine_ca`` finds the engine's CA, the only
                    one imageio's certificates are verified against.

Invariants: no SDK call ever runs on the event loop (the SDK blocks in pycurl); SDK errors
never leave this package raw, they become ``EngineError`` subclasses naming the engine, the
operation and the object. Every recovery step is idempotent: running ``recover`` again over
the same journal resources changes nothing and returns ``[]``.
"""

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from engine.core.errors import ConfigError
from engine.sources.capabilities import Hypervisor
from engine.sources.registry import Plugin

RESTORE_FLOWS = ("imageio", "attach")  # `tessera restore --flow`: upload, or via the DataMover


async def _recover(resources: Mapping[str, Any], committed: bool) -> list[str]:
    """``recovery.recover``: what a killed job left on the engine and the DataMover."""
    from plugins.ovirt.recovery import recover  # noqa: PLC0415 - keep the entry point light

    return await recover(resources, committed)


class OvirtHypervisor:
    """The plugin's ``engine.sources.capabilities.Hypervisor`` (modules imported on use, to
    keep the entry point light)."""

    async def list_vms(self, engine: Any, *, api_gate: Any = None) -> list[dict[str, Any]]:
        """Every VM of ``engine`` (the config's ``EngineSection``) as plain dicts: id,
        name, cluster, status, tags, disks (id, alias, size). What policies select from and
        the daemon API lists."""
        from plugins.ovirt.client import EngineClient, EngineConfig  # noqa: PLC0415
        from plugins.ovirt.inventory import vms  # noqa: PLC0415

        client = EngineClient(EngineConfig.from_section(engine, gate=api_gate))
        try:
            found = await vms(client)
        finally:
            await client.close()
        return [
            {
                "id": v.id,
                "name": v.name,
                "cluster": v.cluster,
                "status": v.status,
                "tags": list(v.tags),
                "host_id": v.host_id,
                "disks": [
                    {
                        "id": d.id,
                        "alias": d.name,
                        "size": d.provisioned_size,
                        "storage_domain_id": d.storage_domain_id,
                    }
                    for d in v.disks
                ],
            }
            for v in found
        ]

    async def plan_vms(self, *args: Any, **kwargs: Any) -> Any:
        """``sources.plan_vms``: what ``vm_sources`` would back up, nothing created."""
        from plugins.ovirt.sources import plan_vms  # noqa: PLC0415

        return await plan_vms(*args, **kwargs)

    async def vm_sources(self, *args: Any, **kwargs: Any) -> Any:
        """``sources.vm_sources``: one Source per VM through the chosen flow."""
        from plugins.ovirt.sources import vm_sources  # noqa: PLC0415

        return await vm_sources(*args, **kwargs)

    def vm_restore(
        self,
        engine: Any,
        manifest: Any,
        ovf: str | None,
        *,
        name: str | None = None,
        cluster: str | None = None,
        storage_domain: str | None = None,
        flow: str = "imageio",
        datamover: Any = None,
        into_vm: str | None = None,
        disk: str | None = None,
        api_gate: Any = None,
    ) -> Any:
        """``restore.vm_restore``: an async context manager giving a ``VmRestore`` (its
        ``make_target`` for ``run_restore``, then ``create_vm()``). ``flow`` ``imageio``
        uploads the disks; ``attach`` writes them through the DataMover (``datamover``: the
        config's section). ``into_vm`` (an existing VM's name or id) gets the disks
        attached instead of a new VM being created; ``disk`` (name or id): only that one.
        Entering it checks the target (``preflight``) before any disk is created."""
        from plugins.ovirt.attach_restore import AttachVmRestore  # noqa: PLC0415
        from plugins.ovirt.restore import RestoreOptions, VmRestore, vm_restore  # noqa: PLC0415

        if flow not in RESTORE_FLOWS:
            raise ConfigError(
                message=f"restore flow {flow!r} is unknown; use one of {RESTORE_FLOWS}"
            )
        options = RestoreOptions(
            name=name,
            cluster=cluster,
            storage_domain=storage_domain,
            into_vm=into_vm,
            disk=disk,
        )
        factory = partial(AttachVmRestore, section=datamover) if flow == "attach" else VmRestore
        return vm_restore(engine, manifest, ovf, options, factory=factory, api_gate=api_gate)

    def standby_refresh(self, engine: Any, manifest: Any, ovf: str | None, standby: Any) -> Any:
        """``standby.standby_refresh``: an async context manager giving the
        ``StandbyTargets`` of ``engine.standby`` (the config's engine section, the
        snapshot's manifest and OVF, the policy's ``Standby``)."""
        from plugins.ovirt.standby import standby_refresh  # noqa: PLC0415

        return standby_refresh(engine, manifest, ovf, standby)

    async def check(self, engine: Any, datamover: Any) -> list[Any]:
        """``doctor.check_engine``: the engine reachable, its CA right, the credentials
        accepted, the DataMover VM found (``datamover`` given)."""
        from plugins.ovirt.doctor import check_engine  # noqa: PLC0415

        return await check_engine(engine, datamover)


PLUGIN = Plugin(name="ovirt", recover=_recover, hypervisor=OvirtHypervisor())


if TYPE_CHECKING:  # mypy proves the plugin fits the engine's capability

    def _fits(h: OvirtHypervisor) -> Hypervisor:
        return h
