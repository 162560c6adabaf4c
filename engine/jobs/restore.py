"""The restore job: a snapshot's disks from the store into Targets, as a state machine.

PREPARING    load and check the manifest, choose the disks
TRANSFERRING the disks, up to ``disks_at_once`` of them at once: for each, create the target
             (recorded in the journal first), write it (``engine.restore.disk``), publish it
COMMITTING   the caller's ``finish`` step, if any (e.g. create the VM, attach the disks)
FINISHING / ABORTING / CANCELLING   targets clean up after themselves (a failed target
             is deleted by its plugin); a killed process is handled by the plugin's recover

Disks at once::

    lane 1:  [make d0 | write d0 ............ | publish]  [make d2 | write d2 ...
    lane 2:            [make d1 | write d1 ......................... | publish]
              ^ targets are made one at a time, in manifest order (the *turn*)

``disks_at_once`` lanes take the disks in manifest order. A disk's target is made only when a
lane takes it and the previous disk's target is made (one ``make_target`` entered at a time),
so the plugins create disks, transfers and attachments, and journal them, in manifest order,
and a disk waiting for its turn holds nothing: no disk, no image transfer an engine could
cancel as idle, no connection. The lanes share the one ``CpuPool``: its buffers (handed out
first come, first served) bound memory and decode work however many disks run. No disk has
a share of its own: a slow disk slows the others toward its pace, and one whose writes never
return ends up holding every buffer. ``progress`` reports every disk (0 of its size at the
start, so waiting disks show too), each under its own name (with its id when two disks
share the name, ``disk_labels``).

When a disk fails, the other lanes are cancelled: each target in the middle of its write
leaves its context by the cancellation and removes its partial disk, as a failed one does;
disks already published stay (a local image; the oVirt plugin deletes its disks as long as
no VM was made). The job's error names the failed disk (``disk NAME (ID): …``) and keeps the
class of what it raised (an integrity error stays one); failures of the cancelled disks'
cleanups ride along as notes.

``make_target(entry, record)`` is the plugin's factory: an async context manager giving a
``TargetDisk`` that publishes on success and removes a partial disk on failure; ``record``
lets it persist what it creates before creating it. The contexts of up to ``disks_at_once``
disks are open at once, entered one at a time.

``base(entry)`` (optional; called in an executor thread before the disk's target is made)
gives the DiskMap of the ids the target already holds, or None: only the slots that differ
from it are written (``engine.restore.disk``); the job closes it. A standby refresh
(``engine.standby``) runs this job as kind ``standby`` with a base per disk.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from engine.core.errors import SnapshotNotFound
from engine.core.ids import chunk_id_from_hex
from engine.core.units import human_bytes, human_rate
from engine.jobs.driver import JobDriver
from engine.jobs.journal import JobRecord, Journal
from engine.jobs.states import Event, State
from engine.pipeline.defaults import DEFAULT_DISKS_AT_ONCE
from engine.restore.disk import RestoreStats, restore_disk
from engine.sources.types import ResourceRecorder, TargetDisk, disk_labels
from engine.store.diskmap import DiskMap
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.util.tasks import run_group
from engine.workers import CpuPool

MakeTarget = Callable[[DiskEntry, ResourceRecorder], AbstractAsyncContextManager[TargetDisk]]
Base = Callable[[DiskEntry], DiskMap | None]
Progress = Callable[[str, int, int], None]


@dataclass
class RestoreOutcome:
    record: JobRecord
    manifest: Manifest | None = None
    disks: list[RestoreStats] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        written = sum(d.bytes_written for d in self.disks)
        rate = sum(d.disk_size for d in self.disks) / self.seconds if self.seconds else 0.0
        return (
            f"restore {self.record.job_id} {self.record.state.value}: snapshot "
            f"{self.record.params.get('snapshot')} ({len(self.disks)} disks), wrote "
            f"{human_bytes(written)}, {self.seconds:.2f} s, {human_rate(rate)}"
            + (f"; error: {self.record.error}" if self.record.error else "")
        )


def select_disks(manifest: Manifest, disk: str | None) -> list[DiskEntry]:
    if disk is None:
        return list(manifest.disks)
    chosen = [d for d in manifest.disks if disk in (d.disk_id, d.name)]
    if not chosen:
        names = ", ".join(d.name for d in manifest.disks)
        raise SnapshotNotFound(
            snapshot=manifest.snapshot_id, reason=f"no disk {disk!r} (has: {names})"
        )
    return chosen


async def run_restore(
    *,
    store: ChunkReader,
    pool: CpuPool,
    snapshot_id: str,
    disks: Sequence[str] | None,
    plugin: str,
    make_target: MakeTarget,
    journal: Journal,
    writers: int = 4,
    disks_at_once: int = DEFAULT_DISKS_AT_ONCE,
    progress: Progress | None = None,
    finish: Callable[[], Awaitable[object]] | None = None,
    job_id: str | None = None,
    base: Base | None = None,
    kind: str = "restore",
    params: dict[str, Any] | None = None,
) -> RestoreOutcome:
    """Restore the disks; then ``finish`` (e.g. create the VM and attach the disks) runs as
    the COMMITTING step, so a failure there fails the job and its targets are cleaned up.
    ``writers``: connections per disk; ``disks_at_once`` (≥ 1), ``base``: see the module
    docstring; ``kind`` and ``params`` (added to the journal's) name the job."""
    if disks_at_once < 1:
        raise ValueError(f"a restore writes at least one disk at once, not {disks_at_once}")
    record = await journal.create(
        kind,
        plugin,
        {"snapshot": snapshot_id, "disks": list(disks or [])} | (params or {}),
        job_id,
    )
    outcome = RestoreOutcome(record)
    failed: list[tuple[BaseException, DiskEntry]] = []  # what a disk raised, and the disk
    driver = JobDriver(journal, record, partial(_failed_disk, failed))
    chosen: list[DiskEntry] = []
    started = time.perf_counter()

    async def remember(key: str, value: Any) -> None:
        record.resources[key] = value
        await journal.save(record)  # durable before the target creates what it names

    held = ExitStack()  # the snapshot's share lock, from PREPARING to the end

    async def prepare() -> Event:
        held.enter_context(store.reading_snapshot(snapshot_id))  # prune skips it
        outcome.manifest = store.manifest(snapshot_id)
        for name in disks or [None]:  # type: ignore[list-item]
            chosen.extend(select_disks(outcome.manifest, name))
        return Event.PREPARED

    async def transfer() -> Event:
        assert outcome.manifest is not None
        disks = _Disks(store, pool, outcome.manifest, make_target, remember, writers, base, failed)
        try:
            await disks.run(chosen, disks_at_once, progress)
        finally:
            outcome.disks = disks.finished()
        return Event.TRANSFERRED

    async def commit() -> Event:
        await remember("restored", [d.disk_id for d in outcome.disks])
        if finish is not None:
            await finish()
        return Event.COMMITTED

    async def cleanup(success: bool) -> None:
        return None  # targets clean up in their context managers

    try:
        await driver.run(
            {State.PREPARING: prepare, State.TRANSFERRING: transfer, State.COMMITTING: commit},
            cleanup,
        )
    finally:
        held.close()
        outcome.seconds = time.perf_counter() - started
        record.summary = {
            "disks": [d.disk_id for d in outcome.disks],
            "bytes_written": sum(d.bytes_written for d in outcome.disks),
            "slots_written": sum(d.slots_written for d in outcome.disks),
            "slots_skipped": sum(d.slots_skipped for d in outcome.disks),
            "seconds": round(outcome.seconds, 3),
        }
        await journal.save_summary(record)
    return outcome


def _failed_disk(failed: list[tuple[BaseException, DiskEntry]], error: BaseException) -> str | None:
    """The disk whose restore raised ``error`` (``JobDriver``'s ``where``), or None."""
    return next((f"disk {e.name} ({e.disk_id})" for x, e in failed if x is error), None)


@dataclass
class _Disks:
    """The TRANSFERRING step: the chosen disks in lanes (module docstring)."""

    store: ChunkReader
    pool: CpuPool
    manifest: Manifest
    make_target: MakeTarget
    record: ResourceRecorder
    writers: int
    base: Base | None
    failed: list[tuple[BaseException, DiskEntry]]  # the run's: what a disk raised, the disk
    results: list[RestoreStats | None] = field(default_factory=list)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)  # FIFO: in the order taken
    labels: dict[str, str] = field(default_factory=dict)  # disk id → name in progress

    async def run(
        self, chosen: Sequence[DiskEntry], disks_at_once: int, progress: Progress | None
    ) -> None:
        """Restore ``chosen``, ``disks_at_once`` at a time; raises the first disk's failure
        as itself (and noted in ``failed``), the others cancelled."""
        self.results = [None] * len(chosen)
        queue = iter(enumerate(chosen))  # shared by the lanes: manifest order

        async def lane() -> None:
            for index, entry in queue:
                try:
                    self.results[index] = await self._one(entry, progress)
                except Exception as e:
                    self.failed.append((e, entry))
                    raise

        self.labels = disk_labels((e.disk_id, e.name) for e in chosen)
        if progress is not None:
            for entry in chosen:
                progress(self.labels[entry.disk_id], 0, entry.size)
        lanes = min(disks_at_once, len(chosen))
        await run_group(lambda tg: [tg.create_task(lane()) for _ in range(lanes)])

    def finished(self) -> list[RestoreStats]:
        """The disks restored, in manifest order."""
        return [stats for stats in self.results if stats is not None]

    async def _one(self, entry: DiskEntry, progress: Progress | None) -> RestoreStats:
        done = 0

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(self.labels[entry.disk_id], done, entry.size)

        async with AsyncExitStack() as held:  # the target left first, then the base closed
            async with self.turn:  # targets are made one at a time, in manifest order
                diskmap = await asyncio.to_thread(self.base, entry) if self.base else None
                if diskmap is not None:
                    held.callback(diskmap.close)
                target = await held.enter_async_context(self.make_target(entry, self.record))
            return await restore_disk(
                self.store,
                self.pool,
                self.manifest,
                entry,
                target,
                writers=self.writers,
                progress=advanced,
                base=diskmap,
            )


async def read_vm_config(store: ChunkReader, manifest: Manifest) -> str | None:
    """The VM configuration stored with the snapshot (the OVF, its first stream) as text, for
    a restore or standby that recreates the VM; None when the snapshot has none or it is not
    an OVF. Raises what ``read_chunk`` raises for a missing or corrupt chunk."""
    config = manifest.config
    if config is None or config.format != "ovf":
        return None
    data: bytes = await asyncio.to_thread(store.read_chunk, chunk_id_from_hex(config.chunk_id))
    return data[: config.size].decode()
