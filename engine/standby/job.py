"""The standby job: bring a VM's standby copy to a snapshot (package docstring for the rules).

::

    refresh_standby(store, pool, journal, engine, vm, standby, snapshot_id=None)
      snapshot: the given one, else the VM's newest → state = state.load(store, vm id)
      targets = the engine's ``Hypervisor.standby_refresh``(engine, manifest, ovf, standby)
      mode:  current  state at this snapshot, no dirty disk: nothing to do (no job)
             full     no state / ``_layout_change`` / ``targets.check`` names a reason;
                      ``targets.full`` checks the target (cluster, storage domain, space,
                      name) first and raises before the job starts, the old standby kept
             refresh  otherwise
      run_restore(kind="standby", one disk at a time) — the restore table, journaled:
        full:    make_target = a new disk per manifest disk (sparse: zero slots skipped);
                 COMMITTING: old standby deleted, old state discarded, VM created, then
                 every disk's map copied and the new state saved
        refresh: base = each disk's map copy (None when dirty); make_target = an upload
                 into the existing standby disk, marked dirty before the first write and
                 clean (map copied, ``applied`` set) after its transfer was finalized;
                 COMMITTING: the state's snapshot advances

The plugin's targets (``StandbyTargets``) clean up after themselves: a failed refresh target
ends its transfer (``plugins.ovirt.standby``), a failed full run deletes what it created.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from engine.config.policy import Standby
from engine.core.errors import SnapshotNotFound
from engine.core.units import human_bytes
from engine.jobs.journal import Journal
from engine.jobs.restore import Progress, RestoreOutcome, read_vm_config, run_restore
from engine.jobs.states import State
from engine.sources import registry
from engine.sources.types import ResourceRecorder, TargetDisk
from engine.standby import state as st
from engine.store.chunk_store import Store
from engine.store.diskmap import DiskMap
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.workers import CpuPool

log = structlog.get_logger("tessera.standby")


@dataclass(frozen=True)
class CreatedStandby:
    vm_id: str
    vm_name: str
    disks: Mapping[str, str]  # source disk id → standby disk id


class FullStandby(Protocol):
    """A full run's targets: ``make_target`` for ``run_restore``, then ``create()``."""

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        """``run_restore``'s ``make_target``: a new sparse disk for ``entry``."""
        ...

    async def create(self) -> CreatedStandby:
        """Create the standby VM (down) with the uploaded disks attached."""
        ...


class StandbyTargets(Protocol):
    """One engine's side of standby refreshes (``plugins.ovirt.standby.OvirtStandby``)."""

    plugin: str  # registry name (journal: crash recovery)
    name: str  # the standby VM's name: ``<vm><suffix>``

    async def check(self, state: st.StandbyState, manifest: Manifest) -> str | None:
        """None when the recorded standby can be refreshed in place; else why a full run is
        needed (VM or disk gone, disk illegal). Raises when it must not be touched at all
        (the standby VM is not down)."""
        ...

    def refresh_target(
        self, entry: DiskEntry, disk: st.StandbyDisk, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        """An upload into the existing standby disk (``fresh`` False); on success its
        transfer is finalized when the context exits, on failure ended (module docstring
        of the plugin) and the error re-raised."""
        ...

    def full(
        self, manifest: Manifest, old: st.StandbyState | None
    ) -> AbstractAsyncContextManager[FullStandby]:
        """A full run replacing ``old`` (None: there is no standby yet); leaving it before
        ``create()`` returned deletes what it made. Entering it checks the target (cluster,
        storage domain, its state and space, the name free but for ``old``'s VM) and raises
        before anything is created or discarded."""
        ...

    async def discard(self, state: st.StandbyState) -> list[str]:
        """Delete what is left of the recorded standby (VM and disks); one line per action."""
        ...


@dataclass
class StandbyOutcome:
    """What one standby run did; ``summary()`` is its one-line report."""

    vm_name: str
    snapshot_id: str
    mode: str  # full | refresh | current
    reason: str | None = None  # why a full run (first refresh, VM deleted…)
    standby_vm_id: str | None = None
    standby_vm_name: str | None = None
    restore: RestoreOutcome | None = None  # None: mode current (no job ran)
    seconds: float = 0.0
    actions: list[str] = field(default_factory=list)  # what was deleted before a full run

    @property
    def ok(self) -> bool:
        return self.restore is None or self.restore.record.state is State.SUCCEEDED

    @property
    def slots_written(self) -> int:
        return sum(d.slots_written for d in self.restore.disks) if self.restore else 0

    @property
    def slots_skipped(self) -> int:
        return sum(d.slots_skipped for d in self.restore.disks) if self.restore else 0

    @property
    def bytes_written(self) -> int:
        if self.restore is None:
            return 0
        return sum(d.bytes_written + d.zero_bytes_written for d in self.restore.disks)

    def summary(self) -> str:
        what = f"standby {self.standby_vm_name or '?'} of VM {self.vm_name}"
        if self.restore is None:
            return f"{what}: already at snapshot {self.snapshot_id}"
        record = self.restore.record
        reason = f" ({self.reason})" if self.reason else ""
        return (
            f"{what} {record.state.value}: {self.mode}{reason} to snapshot {self.snapshot_id}; "
            f"slots written {self.slots_written} / skipped {self.slots_skipped}, "
            f"{human_bytes(self.bytes_written)} written, {self.seconds:.2f} s"
            + (f"; error: {record.error}" if record.error else "")
        )


def latest_snapshot(store: ChunkReader, vm: str) -> str:
    entries = store.snapshots(vm)
    if not entries:
        raise SnapshotNotFound(snapshot=vm, reason="no snapshot of this VM for its standby")
    return entries[-1].snapshot_id


def layout_change(state: st.StandbyState, manifest: Manifest) -> str | None:
    """Why the snapshot's disks do not fit the standby's (a full run is needed), or None.

    A disk that grew means a full run, not a resize: the standby disk is recreated at the
    new size with the rest, which is rare enough not to warrant a second code path."""
    have, want = set(state.disks), {d.disk_id for d in manifest.disks}
    if have != want:
        added = ", ".join(d.name for d in manifest.disks if d.disk_id not in have) or "none"
        removed = ", ".join(state.disks[d].name or d for d in sorted(have - want)) or "none"
        return f"the VM's disks changed (added: {added}; removed: {removed})"
    for d in manifest.disks:
        old = state.disks[d.disk_id].size
        if d.size != old:
            return f"disk {d.name} changed size from {old} to {d.size} bytes"
    return None


async def refresh_standby(
    store: Store,
    pool: CpuPool,
    journal: Journal,
    engine: Any,
    vm: str,
    standby: Standby,
    snapshot_id: str | None = None,
    *,
    job_id: str | None = None,
    progress: Progress | None = None,
    writers: int = 4,
) -> StandbyOutcome:
    """Bring the standby of ``vm`` (id or name) to ``snapshot_id`` (default: its newest
    snapshot in ``store``) on ``engine`` (the config's engine section), as ``standby`` says
    (cluster, storage domain, name suffix). The caller holds the store open for writing and
    runs one standby job per VM at a time.

    Returns the outcome (``ok`` False: the job failed, its error in the journal record);
    raises before any job starts for an unknown VM or snapshot, and ``EngineError``s of
    the plugin's ``check`` (e.g. the standby VM runs)."""
    sid = store.resolve(snapshot_id) if snapshot_id else latest_snapshot(store, vm)
    manifest = store.manifest(sid)
    _, hypervisor = registry.hypervisor(engine)
    ovf = await read_vm_config(store, manifest)
    targets_cm: AbstractAsyncContextManager[StandbyTargets] = hypervisor.standby_refresh(
        engine, manifest, ovf, standby
    )
    async with targets_cm as targets:
        return await run_standby_refresh(
            store=store,
            pool=pool,
            journal=journal,
            manifest=manifest,
            targets=targets,
            job_id=job_id,
            progress=progress,
            writers=writers,
        )


async def run_standby_refresh(
    *,
    store: Store,
    pool: CpuPool,
    journal: Journal,
    manifest: Manifest,
    targets: StandbyTargets,
    job_id: str | None = None,
    progress: Progress | None = None,
    writers: int = 4,
) -> StandbyOutcome:
    """The job of ``refresh_standby`` with its targets given (module docstring)."""
    started = time.perf_counter()
    sid = manifest.snapshot_id
    state = await asyncio.to_thread(st.load, store.path, manifest.vm_id)
    outcome = StandbyOutcome(manifest.vm_name, sid, "refresh", standby_vm_name=targets.name)
    reason: str | None
    if state is None:
        reason = "first refresh"
    else:
        outcome.standby_vm_id, outcome.standby_vm_name = state.standby_vm_id, state.standby_vm_name
        reason = layout_change(state, manifest) or await targets.check(state, manifest)
        dirty = any(d.dirty for d in state.disks.values())
        if reason is None and state.snapshot_id == sid and not dirty:
            outcome.mode = "current"
            return outcome
    common: dict[str, Any] = {
        "store": store,
        "pool": pool,
        "snapshot_id": sid,
        "disks": None,
        "plugin": targets.plugin,
        "journal": journal,
        "writers": writers,
        # One disk at a time: a refresh saves the shared standby state from each disk's
        # target (dirty before its first write, clean after), in threads that would race
        # with several disks at once, and a dirty flag lost in a race would let the next
        # refresh skip slots the disk does not hold.
        "disks_at_once": 1,
        "progress": progress,
        "job_id": job_id,
        "kind": "standby",
    }
    params = {"vm": manifest.vm_name, "standby": targets.name}
    if reason is not None:
        outcome.mode, outcome.reason = "full", reason
        log.info("standby.full", vm=manifest.vm_name, snapshot=sid, reason=reason)
        async with targets.full(manifest, state) as full:
            finish = _FullFinish(store, manifest, targets, state, full, outcome)
            outcome.restore = await run_restore(
                make_target=full.make_target,
                finish=finish,
                params=params | {"mode": "full", "reason": reason},
                **common,
            )
    else:
        assert state is not None
        refresh = _Refresh(store, manifest, targets, state)
        outcome.restore = await run_restore(
            make_target=refresh.make_target,
            base=refresh.base,
            finish=refresh.finish,
            params=params | {"mode": "refresh"},
            **common,
        )
    outcome.seconds = time.perf_counter() - started
    record = outcome.restore.record
    record.summary |= {"mode": outcome.mode, "reason": reason, "standby": outcome.standby_vm_name}
    await journal.save_summary(record)
    log.info("standby.done", summary=outcome.summary())
    return outcome


def _diskmap_file(store: Store, manifest: Manifest, entry: DiskEntry) -> Any:
    return store.layout.snapshot_dir(manifest.snapshot_id) / entry.diskmap


@dataclass
class _FullFinish:
    """COMMITTING of a full run: replace the old standby by the new one, then record it."""

    store: Store
    manifest: Manifest
    targets: StandbyTargets
    old: st.StandbyState | None
    full: FullStandby
    outcome: StandbyOutcome

    async def __call__(self) -> None:
        vm_id = self.manifest.vm_id
        if self.old is not None:
            self.outcome.actions += await self.targets.discard(self.old)
            await asyncio.to_thread(st.discard, self.store.path, vm_id)
        created = await self.full.create()
        self.outcome.standby_vm_id, self.outcome.standby_vm_name = created.vm_id, created.vm_name
        state = st.StandbyState(vm_id, self.manifest.vm_name, created.vm_id, created.vm_name)
        state.history = self.old.history if self.old is not None else []
        for entry in self.manifest.disks:
            source = _diskmap_file(self.store, self.manifest, entry)
            await asyncio.to_thread(st.publish_map, self.store.path, vm_id, entry.disk_id, source)
            state.disks[entry.disk_id] = st.StandbyDisk(
                created.disks[entry.disk_id], entry.size, entry.name, self.manifest.snapshot_id
            )
        state.snapshot_id = self.manifest.snapshot_id
        state.note(mode="full", snapshot=state.snapshot_id, reason=self.outcome.reason)
        await asyncio.to_thread(st.save, self.store.path, state)


@dataclass
class _Refresh:
    """A refresh's ``base``, ``make_target`` and ``finish`` for ``run_restore``."""

    store: Store
    manifest: Manifest
    targets: StandbyTargets
    state: st.StandbyState

    def base(self, entry: DiskEntry) -> DiskMap | None:
        return st.open_base(self.store.path, self.state, entry.disk_id)

    def make_target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AbstractAsyncContextManager[TargetDisk]:
        return self._target(entry, record)

    @asynccontextmanager
    async def _target(
        self, entry: DiskEntry, record: ResourceRecorder
    ) -> AsyncIterator[TargetDisk]:
        disk = self.state.disks[entry.disk_id]
        async with self.targets.refresh_target(entry, disk, record) as target:
            disk.dirty = True  # before the first write (module docstring of ``state``)
            await self._save()
            yield target
        # The transfer was finalized: the disk holds the snapshot's data.
        source = _diskmap_file(self.store, self.manifest, entry)
        await asyncio.to_thread(
            st.publish_map, self.store.path, self.state.vm_id, entry.disk_id, source
        )
        disk.applied, disk.dirty = self.manifest.snapshot_id, False
        await self._save()

    async def finish(self) -> None:
        self.state.snapshot_id = self.manifest.snapshot_id
        self.state.note(mode="refresh", snapshot=self.state.snapshot_id)
        await self._save()

    async def _save(self) -> None:
        await asyncio.to_thread(st.save, self.store.path, self.state)
