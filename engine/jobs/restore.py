"""The restore job: a snapshot's disks from the store into Targets, as a state machine.

PREPARING    load and check the manifest, choose the disks
TRANSFERRING for each disk: create the target (recorded in the journal first), write it
             (``engine.restore.disk``), publish it
COMMITTING   the caller's ``finish`` step, if any (e.g. create the VM, attach the disks)
FINISHING / ABORTING / CANCELLING   targets clean up after themselves (a failed target
             is deleted by its plugin); a killed process is handled by the plugin's recover

``make_target(entry, record)`` is the plugin's factory: an async context manager giving a
``TargetDisk`` that publishes on success and removes a partial disk on failure; ``record``
lets it persist what it creates before creating it.

``base(entry)`` (optional; called in an executor thread before the disk's target is made)
gives the DiskMap of the ids the target already holds, or None: only the slots that differ
from it are written (``engine.restore.disk``); the job closes it. A standby refresh
(``engine.standby``) runs this job as kind ``standby`` with a base per disk.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

from engine.core.errors import SnapshotNotFound
from engine.core.ids import chunk_id_from_hex
from engine.core.units import MiB
from engine.jobs.driver import JobDriver
from engine.jobs.journal import JobRecord, Journal
from engine.jobs.states import Event, State
from engine.restore.disk import RestoreStats, restore_disk
from engine.sources.types import ResourceRecorder, TargetDisk
from engine.store.diskmap import DiskMap
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
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
        rate = sum(d.disk_size for d in self.disks) / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"restore {self.record.job_id} {self.record.state.value}: snapshot "
            f"{self.record.params.get('snapshot')} ({len(self.disks)} disks), wrote "
            f"{written / MiB:.1f} MiB, {self.seconds:.2f} s, {rate:.0f} MB/s"
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
    progress: Progress | None = None,
    finish: Callable[[], Awaitable[object]] | None = None,
    job_id: str | None = None,
    base: Base | None = None,
    kind: str = "restore",
    params: dict[str, Any] | None = None,
) -> RestoreOutcome:
    """Restore the disks; then ``finish`` (e.g. create the VM and attach the disks) runs as
    the COMMITTING step, so a failure there fails the job and its targets are cleaned up.
    ``base``: see the module docstring; ``kind`` and ``params`` (added to the journal's)
    name the job."""
    record = await journal.create(
        kind,
        plugin,
        {"snapshot": snapshot_id, "disks": list(disks or [])} | (params or {}),
        job_id,
    )
    outcome = RestoreOutcome(record)
    driver = JobDriver(journal, record)
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
        for entry in chosen:
            done = 0

            def advanced(n: int, entry: DiskEntry = entry) -> None:
                nonlocal done
                done += n
                if progress is not None:
                    progress(entry.name, done, entry.size)

            diskmap = await asyncio.to_thread(base, entry) if base is not None else None
            try:
                async with make_target(entry, remember) as target:
                    stats = await restore_disk(
                        store,
                        pool,
                        outcome.manifest,
                        entry,
                        target,
                        writers=writers,
                        progress=advanced,
                        base=diskmap,
                    )
            finally:
                if diskmap is not None:
                    diskmap.close()
            outcome.disks.append(stats)
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


async def read_vm_config(store: ChunkReader, manifest: Manifest) -> str | None:
    """The VM configuration stored with the snapshot (the OVF, its first stream) as text, for
    a restore or standby that recreates the VM; None when the snapshot has none or it is not
    an OVF. Raises what ``read_chunk`` raises for a missing or corrupt chunk."""
    config = manifest.config
    if config is None or config.format != "ovf":
        return None
    data: bytes = await asyncio.to_thread(store.read_chunk, chunk_id_from_hex(config.chunk_id))
    return data[: config.size].decode()
