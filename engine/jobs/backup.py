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

from engine.core.units import MiB
from engine.jobs.driver import JobDriver
from engine.jobs.journal import Journal, JobRecord
from engine.jobs.states import Event, State
from engine.pipeline.disk import DEFAULT_READERS, DiskStats, backup_disk
from engine.sources.types import BackupSession, Source
from engine.store.catalog import CatalogEntry
from engine.store.chunk_store import Store
from engine.store.diskmap import DiskMap
from engine.store.manifest import Manifest
from engine.store.snapshot import SnapshotWriter
from engine.util.retry import DEFAULT_POLICY, RetryPolicy
from engine.workers import CpuPool

LEVELS = ("full", "incremental", "differential")
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
        rate = read / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"backup {self.record.job_id} {self.record.state.value}: vm "
            f"{self.record.params.get('vm_name')} level {self.level} snapshot {snap}; read "
            f"{read / MiB:.1f} MiB, new chunks {new}, known {known}, reused slots {reused}, "
            f"{self.seconds:.2f} s, {rate:.0f} MB/s"
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
    store: Store,
    pool: CpuPool,
    source: Source,
    journal: Journal,
    level: str,
    readers: int = DEFAULT_READERS,
    progress: Progress | None = None,
    retry_policy: RetryPolicy = DEFAULT_POLICY,
) -> BackupOutcome:
    """Back up ``source`` into ``store``; returns the outcome (never raises for a job that
    failed — the record says FAILED with the error — but re-raises cancellation)."""
    history = store.snapshots(source.vm_id)
    effective, parent, last_full, note = choose_parent(history, level)
    record = journal.create(
        "backup",
        source.plugin,
        {
            "vm_id": source.vm_id,
            "vm_name": source.vm_name,
            "requested_level": level,
            "level": effective,
        },
    )
    outcome = BackupOutcome(record, None, effective, [note] if note else [])
    driver = JobDriver(journal, record)
    checkpoint = f"tessera-{record.job_id}"
    parent_manifest = store.manifest(parent.snapshot_id) if parent else None
    parent_checkpoint = parent_manifest.tags.get("checkpoint") if parent_manifest else None
    keep = (
        [] if effective == "full" or last_full is None else [last_full_checkpoint(store, last_full)]
    )
    session: BackupSession | None = None
    snap: SnapshotWriter | None = None
    store_writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
    started = time.perf_counter()

    def remember(key: str, value: Any) -> None:
        record.resources[key] = value
        journal.save(record)

    async def prepare() -> Event:
        nonlocal session, snap
        remember("new_checkpoint", checkpoint)
        remember("keep_checkpoints", keep)
        if parent is not None and parent_checkpoint is None:
            outcome.notes.append(f"parent snapshot {parent.snapshot_id} has no checkpoint")
        session = await source.open(
            parent_checkpoint if parent is not None else None, keep, checkpoint, readers, remember
        )
        snap = store.begin_snapshot(
            source.vm_id, source.vm_name, effective, parent.snapshot_id if parent else None
        )
        remember("snapshot_id", snap.snapshot_id)
        return Event.PREPARED

    async def transfer() -> Event:
        assert session is not None and snap is not None
        if session.vm.config is not None:
            snap.set_config(session.vm.config_format, session.vm.config)
        with ExitStack() as stack:
            parents = {}
            if parent_manifest is not None:
                for entry in parent_manifest.disks:
                    parents[entry.disk_id] = stack.enter_context(
                        store.open_diskmap(parent_manifest, entry)
                    )
            for disk in session.disks:
                attributes = dict(disk.info.attributes)
                pdm: DiskMap | None = parents.get(disk.info.disk_id)
                if pdm is None and parent is not None and disk.checkpoint_parent is not None:
                    disk.fallback_reason = "disk not in the parent snapshot: full read"
                writer = snap.add_disk(
                    disk.info.disk_id, disk.info.name, disk.info.size, attributes
                )
                done = 0

                def advanced(
                    n: int, disk_id: str = disk.info.disk_id, size: int = disk.info.size
                ) -> None:
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(disk_id, done, size)

                stats = await backup_disk(
                    store=store,
                    pool=pool,
                    disk=disk,
                    diskmap=writer,
                    parent=pdm if disk.checkpoint_parent is not None else None,
                    store_executor=store_writer,
                    readers=readers,
                    progress=advanced,
                    retry_policy=retry_policy,
                )
                dirty_read = pdm is not None and disk.checkpoint_parent is not None
                facts = {"read": "dirty" if dirty_read and not stats.fallback_reason else "full"}
                if stats.fallback_reason:
                    facts["fallback"] = stats.fallback_reason
                    outcome.notes.append(f"disk {disk.info.name}: {stats.fallback_reason}")
                snap.annotate(writer, facts)
                outcome.disks.append(stats)
                log.info("disk.done", job=record.job_id, summary=stats.summary())
        return Event.TRANSFERRED

    async def commit() -> Event:
        assert snap is not None
        loop = asyncio.get_running_loop()
        outcome.manifest = await loop.run_in_executor(
            store_writer, lambda: snap.commit(tags={"checkpoint": checkpoint, "job": record.job_id})
        )
        return Event.COMMITTED

    async def cleanup(success: bool) -> None:
        try:
            if not success and snap is not None:
                snap.abort()
        finally:
            if session is not None:
                await session.close(success)

    try:
        await driver.run(
            {State.PREPARING: prepare, State.TRANSFERRING: transfer, State.COMMITTING: commit},
            cleanup,
        )
    finally:
        store_writer.shutdown(wait=True)
        outcome.seconds = time.perf_counter() - started
        record.summary = {
            "snapshot": outcome.manifest.snapshot_id if outcome.manifest else None,
            "level": effective,
            "notes": outcome.notes,
            "bytes_read": sum(d.bytes_read for d in outcome.disks),
            "new_chunks": sum(d.new_chunks for d in outcome.disks),
            "seconds": round(outcome.seconds, 3),
        }
        journal.save(record)
    return outcome


def last_full_checkpoint(store: Store, last_full: CatalogEntry) -> str:
    return store.manifest(last_full.snapshot_id).tags.get("checkpoint", "")
