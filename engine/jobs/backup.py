"""The backup job: one VM from a Source into the store, as a state machine.

PREPARING   choose the effective level and parent snapshot, open the source (exports,
            new checkpoint), begin the snapshot
TRANSFERRING back up every disk (``engine.pipeline.disk``), the VM configuration first
COMMITTING  commit the snapshot (its manifest is the commit point)
FINISHING / ABORTING / CANCELLING   close the source (drop old or new checkpoints)

Levels: ``full`` reads every non-zero slot; ``incremental`` reads what changed since the
last snapshot's checkpoint; ``differential`` what changed since the last full's. The first
backup of a VM is full whatever was asked, and says so; a disk whose checkpoint is unusable
falls back to a full read with the reason kept in the manifest.
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import structlog

from engine.core.units import human_bytes, human_rate
from engine.jobs.driver import JobDriver
from engine.jobs.journal import JobRecord, Journal
from engine.jobs.states import Event, State
from engine.pipeline.defaults import DEFAULT_READERS
from engine.pipeline.disk import DiskStats, backup_disk
from engine.sched.level import LEVELS
from engine.sources.types import BackupSession, Source, SourceDisk, disk_labels
from engine.store.catalog import CatalogEntry
from engine.store.diskmap import DiskMap
from engine.store.manifest import Manifest, origin_tags
from engine.store.protocols import BackupStore, ChunkReader
from engine.store.snapshot import SnapshotWriter
from engine.util.retry import DEFAULT_POLICY, RetryPolicy
from engine.workers import CpuPool

log = structlog.get_logger("tessera.backup")

Progress = Callable[[str, int, int], None]  # (disk id, bytes done so far, disk size)


@dataclass
class BackupOutcome:
    record: JobRecord
    manifest: Manifest | None
    level: str
    notes: list[str] = field(default_factory=list)
    disks: list[DiskStats] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        read = sum(d.bytes_read for d in self.disks)
        new = sum(d.new_chunks for d in self.disks)
        known = sum(d.known_chunks for d in self.disks)
        reused = sum(d.clean_slots for d in self.disks)
        snap = self.manifest.snapshot_id if self.manifest else "-"
        rate = read / self.seconds if self.seconds else 0.0
        return (
            f"backup {self.record.job_id} {self.record.state.value}: vm "
            f"{self.record.params.get('vm_name')} level {self.level} snapshot {snap}; read "
            f"{human_bytes(read)}, new chunks {new}, known {known}, reused slots {reused}, "
            f"{self.seconds:.2f} s, {human_rate(rate)}"
            + (f"; error: {self.record.error}" if self.record.error else "")
        )


def choose_parent(
    history: list[CatalogEntry], level: str
) -> tuple[str, CatalogEntry | None, CatalogEntry | None, str | None]:
    """(effective level, parent, last full, note) from the VM's snapshots (oldest first)."""
    fulls = [e for e in history if e.level == "full"]
    last_full = fulls[-1] if fulls else None
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    if not history:
        note = None if level == "full" else f"first backup of this VM: full instead of {level}"
        return "full", None, None, note
    if level == "full":
        return "full", None, last_full, None
    if level == "incremental":
        return "incremental", history[-1], last_full, None
    if last_full is None:
        return "full", None, None, "no full backup to base a differential on: full"
    return "differential", last_full, last_full, None


async def run_backup(
    *,
    store: BackupStore,
    pool: CpuPool,
    source: Source,
    journal: Journal,
    level: str,
    readers: int = DEFAULT_READERS,
    progress: Progress | None = None,
    retry_policy: RetryPolicy = DEFAULT_POLICY,
    job_id: str | None = None,
    policy: str | None = None,
) -> BackupOutcome:
    """Back up ``source`` into ``store``; returns the outcome (never raises for a job that
    failed — the record says FAILED with the error — but re-raises cancellation).
    ``policy``: the policy whose run this is, tagged on the snapshot; None tags it made by
    hand (``engine.store.manifest.origin_tags``)."""
    job = _BackupJob(store, pool, source, journal, level, readers, progress, retry_policy)
    job.origin = origin_tags(policy)
    await job.create_record(job_id)
    steps = {
        State.PREPARING: job.prepare,
        State.TRANSFERRING: job.transfer,
        State.COMMITTING: job.commit,
    }
    started = time.perf_counter()
    try:
        await JobDriver(journal, job.record).run(steps, job.cleanup)
    finally:
        job.store_writer.shutdown(wait=True)
        await job.finish(time.perf_counter() - started)
    return job.outcome


class _BackupJob:
    """One backup run: the state steps ``run_backup`` hands to the driver."""

    record: JobRecord  # these three from ``create_record`` on
    outcome: BackupOutcome
    checkpoint: str
    origin: dict[str, str]  # who made it (``origin_tags``), set by ``run_backup``

    def __init__(
        self,
        store: BackupStore,
        pool: CpuPool,
        source: Source,
        journal: Journal,
        level: str,
        readers: int,
        progress: Progress | None,
        retry_policy: RetryPolicy,
    ):
        """The job's plan; ``create_record`` journals it before anything runs."""
        self.store, self.pool, self.source, self.journal = store, pool, source, journal
        self.readers, self.progress, self.retry_policy = readers, progress, retry_policy
        self.requested_level = level
        effective, self.parent, last_full, self.note = choose_parent(
            store.snapshots(source.vm_id), level
        )
        self.level = effective
        parent = self.parent
        self.parent_manifest = store.manifest(parent.snapshot_id) if parent else None
        self.parent_checkpoint = (
            self.parent_manifest.tags.get("checkpoint") if self.parent_manifest else None
        )
        self.keep = (
            []
            if effective == "full" or last_full is None
            else [last_full_checkpoint(store, last_full)]
        )
        self.session: BackupSession | None = None
        self.snap: SnapshotWriter | None = None
        self.store_writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")

    async def create_record(self, job_id: str | None) -> None:
        """The job's PENDING record, durable in the journal; then ``record``, ``outcome``
        and ``checkpoint`` exist."""
        source = self.source
        params = {
            "vm_id": source.vm_id,
            "vm_name": source.vm_name,
            "requested_level": self.requested_level,
            "level": self.level,
        }
        self.record = await self.journal.create("backup", source.plugin, params, job_id)
        self.outcome = BackupOutcome(
            self.record, None, self.level, [self.note] if self.note else []
        )
        self.checkpoint = f"tessera-{self.record.job_id}"

    async def remember(self, key: str, value: Any) -> None:
        """Persist a resource in the journal before the plugin creates it (returns once
        the record is durable)."""
        self.record.resources[key] = value
        await self.journal.save(self.record)

    async def prepare(self) -> Event:
        await self.remember("new_checkpoint", self.checkpoint)
        await self.remember("keep_checkpoints", self.keep)
        parent = self.parent
        if parent is not None and self.parent_checkpoint is None:
            self.outcome.notes.append(f"parent snapshot {parent.snapshot_id} has no checkpoint")
        self.session = await self.source.open(
            self.parent_checkpoint if parent is not None else None,
            self.keep,
            self.checkpoint,
            self.readers,
            self.remember,
        )
        self.snap = self.store.begin_snapshot(
            self.source.vm_id,
            self.source.vm_name,
            self.outcome.level,
            parent.snapshot_id if parent else None,
        )
        await self.remember("snapshot_id", self.snap.snapshot_id)
        return Event.PREPARED

    async def transfer(self) -> Event:
        session, snap = self.session, self.snap
        assert session is not None
        assert snap is not None
        if session.vm.config is not None:
            snap.set_config(session.vm.config_format, session.vm.config)
        for name, why in session.vm.skipped:
            self.outcome.notes.append(f"disk {name} skipped: {why}")
        with ExitStack() as stack:
            parents: dict[str, DiskMap] = {}
            if self.parent_manifest is not None:
                for entry in self.parent_manifest.disks:
                    diskmap = self.store.open_diskmap(self.parent_manifest, entry)
                    parents[entry.disk_id] = stack.enter_context(diskmap)
            labels = disk_labels((d.info.disk_id, d.info.name) for d in session.disks)
            for disk in session.disks:
                label = labels[disk.info.disk_id]
                await self._transfer_disk(snap, disk, parents.get(disk.info.disk_id), label)
        return Event.TRANSFERRED

    async def _transfer_disk(
        self, snap: SnapshotWriter, disk: SourceDisk, pdm: DiskMap | None, label: str
    ) -> None:
        """Back up one disk; ``label`` names it in progress (``disk_labels``)."""
        info = disk.info
        if pdm is None and self.parent is not None:
            # New to this VM's backups (added, or taken by a changed disk selection): never
            # read against a parent that lacks it, whatever the source says of its bitmap.
            disk.fallback_reason = "disk not in the parent snapshot: full read"
        writer = snap.add_disk(info.disk_id, info.name, info.size, dict(info.attributes))
        done = 0

        def advanced(n: int) -> None:
            nonlocal done
            done += n
            if self.progress is not None:
                self.progress(label, done, info.size)

        try:
            stats = await backup_disk(
                store=self.store,
                pool=self.pool,
                disk=disk,
                diskmap=writer,
                parent=pdm if disk.checkpoint_parent is not None else None,
                readers=self.readers,
                progress=advanced,
                retry_policy=self.retry_policy,
            )
        except BaseException as e:
            try:
                await disk.release()
            except Exception as cleanup:  # noqa: BLE001 - the read's error is the one to raise
                e.add_note(f"releasing disk {info.name}: {cleanup}")
            raise
        await disk.release()  # read: free its export before the next disk is read
        dirty_read = pdm is not None and disk.checkpoint_parent is not None
        facts = {"read": "dirty" if dirty_read and not stats.fallback_reason else "full"}
        if stats.fallback_reason:
            facts["fallback"] = stats.fallback_reason
            self.outcome.notes.append(f"disk {info.name}: {stats.fallback_reason}")
        snap.annotate(writer, facts)
        self.outcome.disks.append(stats)
        log.info("disk.done", job=self.record.job_id, summary=stats.summary())

    async def commit(self) -> Event:
        snap = self.snap
        assert snap is not None
        assert self.session is not None
        checkpoint = self.session.checkpoint
        tags = {"job": self.record.job_id} | self.origin
        tags |= {"checkpoint": checkpoint} if checkpoint else {}
        if skipped := self.session.vm.skipped:
            tags["skipped_disks"] = "; ".join(f"{name}: {why}" for name, why in skipped)
        loop = asyncio.get_running_loop()
        self.outcome.manifest = await loop.run_in_executor(
            self.store_writer,
            lambda: snap.commit(
                consistency=self.session.consistency if self.session else None, tags=tags
            ),
        )
        return Event.COMMITTED

    async def cleanup(self, success: bool) -> None:
        try:
            if not success and self.snap is not None:
                self.snap.abort()
        finally:
            if self.session is not None:
                await self.session.close(success)

    async def finish(self, seconds: float) -> None:
        outcome = self.outcome
        outcome.seconds = seconds
        self.record.summary = {
            "snapshot": outcome.manifest.snapshot_id if outcome.manifest else None,
            "level": outcome.level,
            "notes": outcome.notes,
            "bytes_read": sum(d.bytes_read for d in outcome.disks),
            "new_chunks": sum(d.new_chunks for d in outcome.disks),
            "seconds": round(seconds, 3),
        }
        await self.journal.save_summary(self.record)


def last_full_checkpoint(store: ChunkReader, last_full: CatalogEntry) -> str:
    return store.manifest(last_full.snapshot_id).tags.get("checkpoint", "")
