"""What a plugin can do, as typed capabilities: the engine finds a plugin by what it
provides, never by its name, and type checking goes through the seam.

- ``Hypervisor``  a hypervisor manager's VMs (oVirt's engine): list them, say what a
                  backup of them would read without creating anything (``plan_vms`` →
                  ``VmPlan``s), back them up
                  (``vm_sources`` → ``Source``s), restore a snapshot as a VM
                  (``vm_restore``), keep a cold standby (``standby_refresh``), try the
                  engine's configuration (``check``: ``Check`` items, for
                  ``check-config --deep``).
- ``ImageIO``     local disk images as sources and restore targets.
- ``recover``     every plugin's: finish or undo what a killed job of it left
                  (``Plugin.recover``, from the resources its job journaled).

The engine passes a plugin what it needs, never the store: a restore gets the snapshot's
manifest and its stored VM configuration (``ovf``: the OVF text, or None).
"""

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.sources.types import ResourceRecorder, Source, TargetDisk
from engine.store.manifest import DiskEntry, Manifest

# What every engine call of a job holds (``limits.api_calls`` per engine, across jobs).
ApiGate = Callable[[], AbstractAsyncContextManager[object]]
# The configuration's sections (``engine.config.models``: ``EngineSection``,
# ``DataMoverSection``, ``Standby``), which this layer sits below and names by role only.
EngineSection = Any
DataMoverSection = Any
MakeTarget = Callable[[DiskEntry, ResourceRecorder], AbstractAsyncContextManager[TargetDisk]]


OK, FAILED, SKIPPED = "ok", "FAILED", "skipped"


@dataclass(frozen=True, slots=True)
class Check:
    """One item of the configuration tried for real (``check-config --deep``): ``item``
    names it ("engine lab: credentials"), ``status`` is ``OK``, ``FAILED`` or ``SKIPPED``
    (not tried, or not needed: ``detail`` says why), ``hint`` what to do about a failure."""

    item: str
    status: str
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class PlannedDisk:
    """A disk a backup would read: ``read`` says how (``incremental`` when the flow can
    read only what changed since a checkpoint, else ``full`` with the reason after it)."""

    disk_id: str
    name: str
    size: int  # virtual bytes
    read: str


@dataclass(frozen=True, slots=True)
class VmPlan:
    """What a backup of one VM would do now, read from the hypervisor without creating
    anything on it: the ``flow`` it would run (``auto`` resolved), the disks it would read,
    the disks it would skip (name, reason), the consistency it would get, and ``problem``:
    why the backup would be refused before reading (None: it would start)."""

    vm_id: str
    vm_name: str
    cluster: str | None
    status: str | None
    flow: str
    disks: tuple[PlannedDisk, ...]
    skipped: tuple[tuple[str, str], ...]
    consistency: str | None
    problem: str | None = None


class VmSet(Protocol):
    """The ``Source`` of each VM a backup asked for, and what they share (an engine
    connection), closed with ``aclose`` after the last one was backed up."""

    @property
    def sources(self) -> Sequence[Source]: ...

    async def aclose(self) -> None: ...


class RestoredVmInfo(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...


class VmRestorer(Protocol):
    """One restore of a snapshot into the hypervisor: ``make_target`` per disk (for
    ``engine.jobs.restore.run_restore``), then ``create_vm`` once every disk is written;
    leaving its context before that deletes what it created."""

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]: ...

    async def create_vm(self) -> object: ...

    @property
    def vm(self) -> RestoredVmInfo | None: ...


class Hypervisor(Protocol):
    async def list_vms(
        self, engine: EngineSection, *, api_gate: ApiGate | None = None
    ) -> list[dict[str, Any]]:
        """Every VM as a plain dict: id, name, cluster, status, tags, host_id, disks (id,
        alias, size, storage_domain_id)."""
        ...

    async def plan_vms(
        self,
        engine: EngineSection,
        names: Sequence[str],
        flow: str = "auto",
        *,
        require_quiesce: bool = False,
        datamover: DataMoverSection | None = None,
        api_gate: ApiGate | None = None,
        disks: Sequence[str] = (),
    ) -> list[VmPlan]:
        """What ``vm_sources`` with the same arguments would back up, one ``VmPlan`` per
        VM, found the way ``vm_sources`` finds them and read from the hypervisor only:
        nothing is created, changed or reserved there. Raises what ``vm_sources`` raises
        before a backup starts (an unknown VM or flow, no DataMover); a refusal of one VM
        (``require_quiesce``, a ``disks`` selection taking none of its disks) is that VM's
        ``problem``, and the disks ``disks`` leaves out are among its ``skipped``."""
        ...

    async def vm_sources(
        self,
        engine: EngineSection,
        names: Sequence[str],
        flow: str = "auto",
        *,
        require_quiesce: bool = False,
        datamover: DataMoverSection | None = None,
        api_gate: ApiGate | None = None,
        disks: Sequence[str] = (),
    ) -> VmSet:
        """One ``Source`` per VM name (globs allowed); ConfigError for an unknown VM.
        ``disks`` (``engine.sources.selection``: names/globs of disk aliases, or disk ids;
        empty: all) limits the disks each backup reads: the others are skipped with the
        reason ``not_selected``, and a VM none of whose disks they take fails its backup
        (``NoDiskSelected``) before anything is created."""
        ...

    def vm_restore(
        self,
        engine: EngineSection,
        manifest: Manifest,
        ovf: str | None,
        *,
        name: str | None = None,
        cluster: str | None = None,
        storage_domain: str | None = None,
        flow: str = "imageio",
        datamover: DataMoverSection | None = None,
        into_vm: str | None = None,
        disk: str | None = None,
        api_gate: ApiGate | None = None,
    ) -> AbstractAsyncContextManager[VmRestorer]:
        """The restore's targets (``disk``: only that one, by name or id). Entering it
        checks the target on the engine (cluster, storage domains, their state and space,
        the new VM's name) and raises a ``ConfigError`` listing every problem before
        anything is created."""
        ...

    def standby_refresh(
        self, engine: EngineSection, manifest: Manifest, ovf: str | None, standby: Any
    ) -> AbstractAsyncContextManager[Any]:
        """``engine.standby.job.StandbyTargets`` for ``manifest`` (``standby``: the
        policy's ``Standby``)."""
        ...

    async def check(self, engine: EngineSection, datamover: DataMoverSection | None) -> list[Check]:
        """Try ``engine`` for real: reachable, its certificate verified, the credentials
        accepted, and the DataMover VM found when ``datamover`` is given. One ``Check``
        per item, in that order; an item that could not be tried because an earlier one
        failed is ``SKIPPED``. Never raises for what it checks; bounded in time."""
        ...


class ImageIO(Protocol):
    def image_source(self, paths: Sequence[Path], vm_name: str | None = None) -> Source: ...

    def image_target(
        self, path: Path, entry: DiskEntry, record: ResourceRecorder, fmt: str | None = None
    ) -> AbstractAsyncContextManager[TargetDisk]: ...


Commands = Mapping[str, Callable[..., Any]]
