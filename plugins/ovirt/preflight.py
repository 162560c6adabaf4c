"""What a restore into the engine checks before it creates anything (issue 16, point 4).

Every oVirt restore flow (imageio uploads, the DataMover) and a standby's full run create
disks first and the VM last; without a check, a target the engine cannot take is found
out only by the call that needs it: after every disk was uploaded (a VM name in use, a
missing cluster) or at the first disk (a missing or inactive storage domain). ``check``
reads the engine once, before the first disk, and raises one ``RestoreTargetError``
listing *every* problem found::

    cluster       exists (by name or id) — when a VM is to be created
    VM name       no other VM has it (``replaces``: the id of a VM that may keep it, e.g. a
                  standby's old VM, deleted before the new one is created)
    each domain   exists (name or id); is a data domain; is attached to the data center of
                  the cluster (or to some data center, when no cluster is known) and
                  ``active`` there (``datacenters/{dc}/storagedomains/{sd}``: the top level
                  has no status for an attached domain); its ``available`` bytes cover what
                  the new disks on it will allocate
    each disk     has a storage domain (given, or recorded at backup time)

What a new disk allocates (``need``): a preallocated disk its whole virtual size; a thin
disk on block storage the ``initial_size`` it is created with (``volumes.shape``); a thin
disk on file storage the same bound, since its file grows by what the upload writes
(``volumes.initial_size``: the data in clusters plus the qcow2 metadata). The engine may
still refuse a disk that fits (its own free-space thresholds, ``CriticalSpaceActionBlocker``,
are not visible through the API); space taken by others after the check is not ours to
reserve.

Disks are named by their names; a name two disks share gets the disk id in parentheses
(``disk_labels``).

Raised: ``RestoreTargetError`` (a ``ConfigError``: the operator fixes the target or the
request), the ``EngineError``s of ``client`` when the engine cannot be read.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.sources.types import disk_labels
from plugins.ovirt import inventory, volumes
from plugins.ovirt.client import EngineClient, EngineNotFound


class RestoreTargetError(ConfigError):
    template = "{what}: the target is not ready; nothing was created on the engine:\n{listing}"


@dataclass(frozen=True, slots=True)
class NewDisk:
    """A disk a restore will create: the manifest's name and (source) disk id, the storage
    domain (name or id; None: none recorded nor named), format, sparseness and sizes."""

    name: str
    disk_id: str
    domain: str | None
    format: str  # cow | raw, as recorded
    sparse: bool
    size: int  # virtual bytes
    data_bytes: int  # stored data (non-zero slots × chunk size)


async def need(disk: NewDisk, sd: inventory.StorageDomainRef) -> int:
    """The bytes ``disk`` will allocate on ``sd`` (module docstring)."""
    want = await volumes.shape(
        disk.format, disk.sparse, block=sd.block, virtual=disk.size, data_bytes=disk.data_bytes
    )
    if want.initial_size is not None:
        return want.initial_size
    if not want.sparse:
        return disk.size
    return await volumes.initial_size(disk.size, disk.data_bytes)


def _names(objs: Sequence[inventory.StorageDomainRef] | Sequence[inventory.ClusterRef]) -> str:
    return ", ".join(o.name for o in objs) or "none"


async def check(
    client: EngineClient,
    *,
    what: str,
    disks: Sequence[NewDisk],
    cluster: str | None,
    vm_name: str | None,
    replaces: str | None = None,
) -> None:
    """Check the target of a restore (module docstring): ``cluster`` (name or id; None: no
    VM is created, e.g. disks restored into an existing VM, whose cluster id to give here
    instead for the data-center check), ``vm_name`` (the new VM's; None: no VM is
    created), ``replaces``. ``what`` starts the error ("restore of VM web01"). Raises
    ``RestoreTargetError`` listing every problem; returns None when there is none."""
    problems: list[str] = []
    dc_id: str | None = None
    cluster_name = cluster
    if cluster is not None:
        clusters = await inventory.clusters(client)
        found = next((c for c in clusters if cluster in (c.id, c.name)), None)
        if found is None:
            problems.append(
                f"cluster {cluster} does not exist (the engine has: {_names(clusters)})"
            )
        else:
            dc_id, cluster_name = found.data_center_id, found.name
    if vm_name is not None:
        taken = [
            v
            for v in await inventory.vms(client, name_glob=vm_name)
            if v.name == vm_name and v.id != replaces
        ]
        if taken:
            problems.append(
                f"a VM named {vm_name} already exists (id {taken[0].id}); choose another name"
            )
    problems += await _domains(client, disks, dc_id, cluster_name)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise RestoreTargetError(what=what, problems=tuple(problems), listing=listing)


async def _domains(
    client: EngineClient, disks: Sequence[NewDisk], dc_id: str | None, cluster: str | None
) -> list[str]:
    """The problems of the disks' storage domains (module docstring)."""
    problems: list[str] = []
    labels = disk_labels((d.disk_id, d.name) for d in disks)
    domains = await inventory.storage_domains(client)
    wanted: dict[str, list[tuple[NewDisk, int]]] = {}  # domain id → its new disks, needs
    missing: dict[str, list[str]] = {}  # unknown domain → the disks that name it
    for disk in disks:
        if disk.domain is None:
            problems.append(f"disk {labels[disk.disk_id]}: no storage domain recorded; name one")
            continue
        sd = next((s for s in domains if disk.domain in (s.id, s.name)), None)
        if sd is None:
            missing.setdefault(disk.domain, []).append(labels[disk.disk_id])
            continue
        wanted.setdefault(sd.id, []).append((disk, await need(disk, sd)))
    for name, of in missing.items():
        problems.append(
            f"storage domain {name} (for disk {', '.join(of)}) does not exist "
            f"(the engine has: {_names(domains)})"
        )
    by_id = {s.id: s for s in domains}
    for sd_id, items in wanted.items():
        sd = by_id[sd_id]
        problems += await _state(client, sd, dc_id, cluster)
        total = sum(n for _, n in items)
        if sd.available is not None and total > sd.available:
            each = ", ".join(f"{labels[d.disk_id]} {human_bytes(n)}" for d, n in items)
            problems.append(
                f"storage domain {sd.name} has {human_bytes(sd.available)} free; the new "
                f"disks need {human_bytes(total)} ({each})"
            )
    return problems


async def _state(
    client: EngineClient, sd: inventory.StorageDomainRef, dc_id: str | None, cluster: str | None
) -> list[str]:
    """Why ``sd`` cannot take new disks for a VM in data center ``dc_id``, if it cannot."""
    if sd.type not in (None, "data"):
        return [f"storage domain {sd.name} is a {sd.type} domain, not a data domain"]
    if not sd.data_center_ids:
        return [f"storage domain {sd.name} is not attached to a data center"]
    if dc_id is not None and dc_id not in sd.data_center_ids:
        return [f"storage domain {sd.name} is not attached to the data center of cluster {cluster}"]
    try:
        status = await inventory.storage_domain_status(
            client, dc_id or sd.data_center_ids[0], sd.id
        )
    except EngineNotFound:
        return [f"storage domain {sd.name} is not attached to a data center"]
    if status != "active":
        return [f"storage domain {sd.name} is {status}, not active"]
    return []
