"""What the three backup flows (``backup``, ``snapshot``, ``attach``) share before they create
anything on the engine: the VM and its client, which disks can be read, the VM's OVF and the
consistency a backup of it gets now, and the ``VmInfo`` the job records."""

from collections.abc import Mapping, Sequence
from typing import Any

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.core.errors import ConfigError
from engine.sources.selection import no_disk_selected, not_selected, selects_disk
from engine.sources.types import DiskInfo, VmInfo
from plugins.ovirt.client import EngineClient
from plugins.ovirt.inventory import DiskRef, VmRef

log = structlog.get_logger("tessera.ovirt")


class OvirtSourceBase:
    """What every oVirt backup flow shares: the VM, the engine client, the recovery config,
    and the guest facts read before anything is created on the engine.

    ``require_quiesce`` refuses (``ConfigError`` naming the VM, before anything is created) a
    running VM whose guest agent reports nothing: its backup could only be crash-consistent
    (API-NOTES § 7.1).

    ``disks`` (names/globs of disk aliases, or disk ids; empty: every disk) limits the disks
    read (``engine.sources.selection``)."""

    plugin = "ovirt"

    def __init__(
        self,
        client: EngineClient,
        vm: VmRef,
        config: dict[str, Any],
        *,
        require_quiesce: bool = False,
        disks: Sequence[str] = (),
    ):
        self.client = client
        self.vm = vm
        self.vm_id = vm.id
        self.vm_name = vm.name
        self.require_quiesce = require_quiesce
        self.disks = tuple(disks)
        self._config = config  # engine url/user/password_file/ca_file, for recovery

    def readable_disks(self) -> tuple[list[DiskRef], tuple[tuple[str, str], ...]]:
        """(the active disks a flow reads, (name, reason) of each disk it must skip).

        Direct LUNs and shareable disks are never put in a backup request, snapshot or
        transfer: the engine filters them out of backups and snapshots, and neither has an
        image to read (``DiskRef.skip_reason``). A disk the ``disks`` patterns do not take
        is skipped as ``not selected``; when they take none of the VM's disks, raises
        ``NoDiskSelected`` (a ``ConfigError``: the VM's backup fails before anything is
        created). Inactive (unplugged) disks the patterns take are left out as before,
        without a note."""
        if self.disks and not any(selects_disk(self.disks, d.name, d.id) for d in self.vm.disks):
            raise no_disk_selected(self.vm.name, self.disks, [d.name for d in self.vm.disks])
        disks, skipped = [], []
        for d in self.vm.disks:
            why = None if selects_disk(self.disks, d.name, d.id) else not_selected(self.disks)
            if (why := why or d.skip_reason) is not None:
                skipped.append((d.name, why))
                log.info("disk skipped", vm=self.vm.name, disk=d.name, reason=why)
            elif d.active:
                disks.append(d)
        return disks, tuple(skipped)

    async def facts(self) -> tuple[bytes | None, str]:
        """(OVF, consistency) from ``vm_facts``; raises ConfigError under require_quiesce."""
        ovf, consistency = await vm_facts(self.client, self.vm)
        if consistency == "crash" and self.require_quiesce:
            raise ConfigError(
                message=f"VM {self.vm.name}: no responsive guest agent (it reports no guest "
                "OS), so its backup cannot be quiesced; require_quiesce refuses a "
                "crash-consistent backup"
            )
        return ovf, consistency

    def vm_info(
        self,
        disks: Sequence[DiskRef],
        ovf: bytes | None,
        skipped: tuple[tuple[str, str], ...],
        attributes: Mapping[str, str] | None = None,
        per_disk: Mapping[str, Mapping[str, str]] | None = None,
    ) -> VmInfo:
        """The ``VmInfo`` a flow opens with: each disk's recorded facts (format, interface,
        bootable, storage domain), plus ``attributes`` for every disk and ``per_disk[id]``
        for one; the OVF as the VM's configuration."""
        return VmInfo(
            self.vm.id,
            self.vm.name,
            tuple(
                DiskInfo(
                    d.id,
                    d.name,
                    d.provisioned_size,
                    {
                        "format": d.format,
                        "interface": d.interface or "",
                        "bootable": str(d.bootable).lower(),
                        "storage_domain": d.storage_domain_id or "",
                    }
                    | dict(attributes or {})
                    | dict((per_disk or {}).get(d.id, {})),
                )
                for d in disks
            ),
            config=ovf,
            config_format="ovf",
            skipped=skipped,
        )


async def vm_facts(client: EngineClient, vm: VmRef) -> tuple[bytes | None, str]:
    """The VM's OVF (read with ``all_content``, saved with every snapshot so a restore can
    recreate the VM) and the consistency a backup of it now gets: ``offline`` (not running),
    ``application`` (a guest agent reports, so it can freeze the filesystems) or ``crash``."""

    def get(conn: sdk.Connection) -> Any:
        return conn.system_service().vms_service().vm_service(vm.id).get(all_content=True)

    found = await client.call(get, "read VM configuration", obj=f"VM {vm.name}")
    config = found.initialization.configuration if found.initialization else None
    ovf = config.data.encode() if config is not None and config.data else None
    if found.status != t.VmStatus.UP:
        return ovf, "offline"
    agent = found.guest_operating_system is not None or bool(found.fqdn)
    return ovf, "application" if agent else "crash"
