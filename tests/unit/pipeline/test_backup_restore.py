"""The backup and restore pipelines on the in-memory source and target, with a real store
and with the in-memory one (``tests.memory_store``): every test runs on both.

Each test runs the jobs (``run_backup``, ``run_restore``) as the CLI and the daemon do, over
``tests.memory``: which slots are read (the source logs every read), what the DiskMaps and
stats say, what a failing or cancelled read or write leaves behind, and that every snapshot
restores byte-identical to what the disks held when it was taken.
"""

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.core.errors import CorruptRecord, EngineError, TransientError
from engine.core.ids import ZERO_ID
from engine.core.units import KiB
from engine.jobs.backup import BackupOutcome, run_backup
from engine.jobs.journal import Journal
from engine.jobs.restore import RestoreOutcome, run_restore
from engine.jobs.states import State
from engine.pipeline import disk as pipeline_disk
from engine.sources.types import ResourceRecorder, TargetDisk
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.util.retry import RetryPolicy
from engine.workers import ThreadCpuPool
from engine.workers.pool import CpuPool
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes
from tests.memory import (
    MemoryDisk,
    MemorySource,
    MemorySourceDisk,
    MemoryTargetDisk,
    MemoryTargets,
    MemoryVm,
    Ranges,
)
from tests.memory_store import MemoryStore

CHUNK = 64 * KiB
SLOTS = 40  # and a short last slot
TAIL = 5000
READERS = 3
ATTEMPTS = 3
POLICY = RetryPolicy(attempts=ATTEMPTS, base_delay=0.0001, max_delay=0.001)


def slot(i: int) -> int:
    return i * CHUNK


@functools.cache
def os_disk() -> bytes:
    """40 slots and a short one: data, a run of zero slots (10-19), a slot half zero (25),
    one block four times (30-33: stored once), data in the last slot."""
    data = bytearray(realistic_bytes(SLOTS * CHUNK + TAIL, seed=1))
    data[slot(10) : slot(20)] = bytes(10 * CHUNK)
    data[slot(25) : slot(25) + CHUNK // 2] = bytes(CHUNK // 2)
    block = os.urandom(CHUNK)
    for i in range(30, 34):
        data[slot(i) : slot(i + 1)] = block
    return bytes(data)


ZERO_SLOTS = frozenset(range(10, 20))
DATA_SLOTS = frozenset(range(SLOTS + 1)) - ZERO_SLOTS
BLANK_SLOTS = 8


@dataclass
class Rig:
    store: Store | MemoryStore
    pool: CpuPool
    journal: Journal
    vm: MemoryVm
    source: MemorySource

    @property
    def os(self) -> MemoryDisk:
        return self.vm.disks[0]

    @property
    def blank(self) -> MemoryDisk:
        return self.vm.disks[1]

    async def backup(self, level: str, **kw: object) -> BackupOutcome:
        """One backup; the disks' logs start empty for it."""
        for d in self.vm.disks:
            d.reads.clear()
            d.extent_calls.clear()
            d.dirty_calls.clear()
        return await run_backup(
            store=self.store,
            pool=self.pool,
            source=self.source,
            journal=self.journal,
            level=level,
            readers=READERS,
            retry_policy=POLICY,
            **kw,  # type: ignore[arg-type]
        )

    async def restore(
        self, manifest: Manifest, targets: MemoryTargets | None = None, **kw: object
    ) -> tuple[RestoreOutcome, MemoryTargets]:
        targets = targets if targets is not None else MemoryTargets()
        outcome = await run_restore(
            store=self.store,
            pool=self.pool,
            snapshot_id=manifest.snapshot_id,
            disks=None,
            plugin="memory",
            make_target=targets.make_target,
            journal=self.journal,
            writers=3,
            **kw,  # type: ignore[arg-type]
        )
        return outcome, targets

    async def assert_restores(self, manifest: Manifest, disks: dict[str, bytes]) -> None:
        outcome, targets = await self.restore(manifest)
        assert outcome.record.state is State.SUCCEEDED, outcome.record.error
        assert targets.published == disks
        for target in targets.disks:
            assert target.open_writers == 0
            assert all(w.flushed for w in target.writers)

    def contents(self) -> dict[str, bytes]:
        return {d.disk_id: bytes(d.data) for d in self.vm.disks}


@pytest.fixture(params=["store", "memory"])
async def rig(
    request: pytest.FixtureRequest, make_store: StoreFactory, tmp_path: Path
) -> AsyncIterator[Rig]:
    store: Store | MemoryStore = (
        make_store(chunk_size=CHUNK)
        if request.param == "store"
        else MemoryStore(tmp_path / "memory", chunk_size=CHUNK)
    )
    pool = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=8)
    vm = MemoryVm(
        "vm-1",
        "web01",
        [
            MemoryDisk("disk-os", "web01_os", bytearray(os_disk()), {"format": "cow"}),
            MemoryDisk("disk-blank", "web01_blank", bytearray(BLANK_SLOTS * CHUNK)),
        ],
        config=b'{"memory": 2048}',
    )
    try:
        yield Rig(store, pool, Journal(store.path / "journal"), vm, MemorySource(vm))
    finally:
        await pool.aclose()


def slots_read(disk: MemoryDisk) -> set[int]:
    """The slots the backup read: every read is one whole slot."""
    for offset, length in disk.reads:
        assert offset % CHUNK == 0
        assert length == min(CHUNK, disk.size - offset)
    return {offset // CHUNK for offset, _ in disk.reads}


def diskmap_ids(store: ChunkReader, manifest: Manifest, index: int) -> list[bytes]:
    with store.open_diskmap(manifest, manifest.disks[index]) as dm:
        return [cid for _, cid in dm.iter_ids()]


async def test_full_backup_reads_data_slots_once_and_restores_exactly(rig: Rig) -> None:
    done: dict[str, int] = {}
    outcome = await rig.backup("full", progress=lambda disk, n, size: done.update({disk: n}))
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    manifest = outcome.manifest
    assert manifest is not None
    assert (outcome.level, manifest.level, manifest.parent) == ("full", "full", None)
    assert [d.disk_id for d in manifest.disks] == ["disk-os", "disk-blank"]

    assert slots_read(rig.os) == DATA_SLOTS
    assert len(rig.os.reads) == len(DATA_SLOTS)  # each once
    assert rig.blank.reads == []
    assert rig.os.dirty_calls == []
    os_stats, blank_stats = outcome.disks
    assert os_stats.zero_slots == len(ZERO_SLOTS)
    assert os_stats.read_slots == len(DATA_SLOTS)
    assert os_stats.bytes_read == len(rig.os.data) - len(ZERO_SLOTS) * CHUNK
    assert os_stats.new_chunks == len(DATA_SLOTS) - 3  # slots 31-33 repeat slot 30
    assert os_stats.known_chunks == 3
    assert (blank_stats.zero_slots, blank_stats.read_slots) == (BLANK_SLOTS, 0)
    assert done == {"web01_os": len(rig.os.data), "web01_blank": BLANK_SLOTS * CHUNK}
    assert [d.name for d in outcome.disks] == ["web01_os", "web01_blank"]  # for the mails
    ids = diskmap_ids(rig.store, manifest, 0)
    assert [i for i, cid in enumerate(ids) if cid == ZERO_ID] == sorted(ZERO_SLOTS)
    assert set(diskmap_ids(rig.store, manifest, 1)) == {ZERO_ID}

    # The session: VM configuration stored first, checkpoint recorded, closed once.
    (session,) = rig.vm.sessions
    assert session.closed == [True]
    assert manifest.tags["checkpoint"] == session.checkpoint
    assert manifest.config is not None
    assert rig.store.read_chunk(bytes.fromhex(manifest.config.chunk_id)) == rig.vm.config  # type: ignore[arg-type]
    assert session.unreleased_at_close == []  # the job released each disk once read
    assert rig.vm.open_readers == 0

    outcome_r, targets = await rig.restore(manifest)
    assert outcome_r.record.state is State.SUCCEEDED, outcome_r.record.error
    assert targets.published == rig.contents()
    # A fresh target: zero slots are never written.
    os_target = targets.disks[0]
    assert os_target.zeroes == []
    assert {off // CHUNK for off, _ in os_target.writes} == DATA_SLOTS


async def test_progress_names_disks_and_adds_the_id_only_to_a_shared_name(rig: Rig) -> None:
    rig.vm.disks.append(MemoryDisk("disk-os2", "web01_os", bytearray(2 * CHUNK)))
    seen: set[str] = set()
    outcome = await rig.backup("full", progress=lambda disk, n, size: seen.add(disk))
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert seen == {"web01_os (disk-os)", "web01_blank", "web01_os (disk-os2)"}
    assert outcome.manifest is not None
    seen.clear()
    restored, _ = await rig.restore(outcome.manifest, progress=lambda disk, n, size: seen.add(disk))
    assert restored.record.state is State.SUCCEEDED, restored.record.error
    assert seen == {"web01_os (disk-os)", "web01_blank", "web01_os (disk-os2)"}


async def test_incremental_reads_only_the_dirty_slots(rig: Rig) -> None:
    full = await rig.backup("full")
    assert full.manifest is not None
    before = rig.contents()
    rig.os.write(slot(2) + 100, b"x" * 10)
    rig.os.write(slot(16) - 6, b"y" * 12)  # across the boundary of slots 15 and 16 (zero)
    rig.os.write(slot(30), bytes(CHUNK))  # a data slot overwritten with zeroes: no read
    rig.os.write(slot(SLOTS) + 10, b"z")  # the short last slot
    outcome = await rig.backup("incremental")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    manifest = outcome.manifest
    assert manifest is not None
    assert (manifest.level, manifest.parent) == ("incremental", full.manifest.snapshot_id)

    assert slots_read(rig.os) == {2, 15, 16, SLOTS}
    assert rig.blank.reads == []
    assert rig.os.dirty_calls, "the pipeline asked which ranges changed"
    os_stats, blank_stats = outcome.disks
    assert os_stats.read_slots == 4
    assert os_stats.zero_slots == len(ZERO_SLOTS) - 2 + 1  # 15 and 16 hold data, 30 none
    assert os_stats.clean_slots == SLOTS + 1 - 4 - os_stats.zero_slots
    assert blank_stats.clean_slots == 0 and blank_stats.zero_slots == BLANK_SLOTS
    assert [d.attributes["read"] for d in manifest.disks] == ["dirty", "dirty"]
    # Clean slots took the parent's ids.
    old, new = diskmap_ids(rig.store, full.manifest, 0), diskmap_ids(rig.store, manifest, 0)
    changed = {i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b}
    assert changed == {2, 15, 16, 30, SLOTS}

    await rig.assert_restores(full.manifest, before)
    await rig.assert_restores(manifest, rig.contents())


async def test_differential_reads_everything_changed_since_the_full(rig: Rig) -> None:
    full = await rig.backup("full")
    rig.os.write(slot(3), b"a" * 100)
    first = await rig.backup("incremental")
    rig.os.write(slot(7) + 5, b"b" * 100)
    outcome = await rig.backup("differential")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert full.manifest is not None and first.manifest is not None
    assert outcome.manifest is not None
    # The full's checkpoint survived the incremental (kept for differentials).
    assert outcome.manifest.parent == full.manifest.snapshot_id
    assert slots_read(rig.os) == {3, 7}
    assert outcome.disks[0].fallback_reason is None
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_disk_without_checkpoints_is_read_in_full_with_the_reason(rig: Rig) -> None:
    rig.os.checkpoints = False
    await rig.backup("full")
    rig.os.write(slot(3), b"a" * 100)
    outcome = await rig.backup("incremental")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert outcome.manifest is not None
    assert slots_read(rig.os) == DATA_SLOTS
    os_entry, blank_entry = outcome.manifest.disks
    assert os_entry.attributes["read"] == "full"
    assert "keeps no checkpoints" in os_entry.attributes["fallback"]
    assert blank_entry.attributes["read"] == "dirty"
    assert any("keeps no checkpoints" in note for note in outcome.notes)
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_a_disk_not_in_the_parent_snapshot_is_read_in_full(rig: Rig) -> None:
    """A disk the parent snapshot lacks (added, or taken by a changed disk selection) is
    read in full even when the source offers it incrementally: its clean slots have no
    parent ids to take. Here its bitmap claims nothing changed, so a dirty read would
    store a blank disk."""
    first, added = rig.os, rig.blank
    rig.vm.disks = [first]  # the full backs up the OS disk only
    full = await rig.backup("full")
    assert full.manifest is not None
    assert [d.name for d in full.manifest.disks] == ["web01_os"]
    added.write(slot(2), b"q" * 100)  # no bitmap yet: nothing records it
    added.bitmaps[full.manifest.tags["checkpoint"]] = Ranges()  # says: nothing changed
    rig.vm.disks.append(added)
    first.write(slot(3), b"a" * 100)
    outcome = await rig.backup("incremental")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert outcome.manifest is not None
    assert slots_read(first) == {3}
    assert slots_read(added) == {2}
    os_entry, blank_entry = outcome.manifest.disks
    assert os_entry.attributes["read"] == "dirty"
    assert blank_entry.attributes["read"] == "full"
    assert blank_entry.attributes["fallback"] == "disk not in the parent snapshot: full read"
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_zero_slots_the_source_does_not_report_are_found_by_reading(rig: Rig) -> None:
    rig.os.zero_extents = False
    outcome = await rig.backup("full")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert outcome.manifest is not None
    assert slots_read(rig.os) == set(range(SLOTS + 1))  # every slot read...
    assert outcome.disks[0].zero_slots == len(ZERO_SLOTS)  # ...zero ones stored as ZERO
    ids = diskmap_ids(rig.store, outcome.manifest, 0)
    assert [i for i, cid in enumerate(ids) if cid == ZERO_ID] == sorted(ZERO_SLOTS)
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_extents_are_asked_window_by_window(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_disk, "WINDOW_BYTES", 3 * CHUNK)
    full = await rig.backup("full")
    assert full.record.state is State.SUCCEEDED, full.record.error
    size = len(rig.os.data)
    windows = [(o, min(3 * CHUNK, size - o)) for o in range(0, size, 3 * CHUNK)]
    assert rig.os.extent_calls == windows
    rig.os.write(slot(20) + 1, b"q" * 3)
    outcome = await rig.backup("incremental")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert rig.os.dirty_calls == windows
    assert slots_read(rig.os) == {20}
    assert full.manifest is not None and outcome.manifest is not None
    await rig.assert_restores(outcome.manifest, rig.contents())


def fail_reads(
    at: int, times: int, error: Callable[[], Exception]
) -> tuple[Callable[[MemoryDisk, int, int], Awaitable[None]], list[int]]:
    """A ``before_read`` hook raising ``error()`` for the first ``times`` reads at ``at``;
    and the list of offsets it was called for at ``at``."""
    calls: list[int] = []

    async def hook(disk: MemoryDisk, offset: int, length: int) -> None:
        if offset == at:
            calls.append(offset)
            if len(calls) <= times:
                raise error()

    return hook, calls


def turns(n: int) -> Callable[[MemoryDisk, int, int], Awaitable[None]]:
    """A ``before_read`` hook that lets the loop turn ``n`` times (other reads start)."""

    async def hook(disk: MemoryDisk, offset: int, length: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    return hook


async def test_a_pipelining_source_gets_lanes_sharing_each_reader(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``reader_pipeline`` 2 (imageio): each reader's connection has two reads in flight."""
    monkeypatch.setattr(MemorySourceDisk, "reader_pipeline", 2, raising=False)
    in_flight, peak = 0, 0
    wait = turns(5)

    async def counted(disk: MemoryDisk, offset: int, length: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await wait(disk, offset, length)
        finally:
            in_flight -= 1

    rig.os.before_read = counted
    outcome = await rig.backup("full")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert peak == 2 * READERS
    assert rig.os.readers_opened == READERS  # the lanes share the connections
    assert slots_read(rig.os) == DATA_SLOTS
    assert rig.vm.open_readers == 0
    assert outcome.manifest is not None
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_a_failed_read_in_one_lane_does_not_cut_the_other_short(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed read's reader is set aside, and closed only once the other lane's read in
    flight on it is done; the retry and later reads go to a new one."""
    monkeypatch.setattr(MemorySourceDisk, "reader_pipeline", 2, raising=False)
    fail, wait = fail_reads(slot(5), 1, lambda: TransientError(message="reset")), turns(5)

    async def hook(disk: MemoryDisk, offset: int, length: int) -> None:
        await wait(disk, offset, length)  # the sibling lane's read is in flight meanwhile
        await fail[0](disk, offset, length)

    rig.os.before_read = hook
    outcome = await rig.backup("full")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert outcome.disks[0].retries == 1
    assert rig.os.readers_opened == READERS + 1
    assert rig.vm.open_readers == 0
    assert outcome.manifest is not None
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_transient_read_failures_are_retried_on_a_new_connection(rig: Rig) -> None:
    rig.os.before_read, calls = fail_reads(
        slot(5), 2, lambda: TransientError(message="connection reset")
    )
    outcome = await rig.backup("full")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert len(calls) == 3
    assert outcome.disks[0].retries == 2
    assert rig.os.readers_opened == READERS + 2  # each retry on a new connection
    assert rig.vm.open_readers == 0
    assert outcome.manifest is not None
    await rig.assert_restores(outcome.manifest, rig.contents())


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        (lambda: TransientError(message="connection reset"), ATTEMPTS),
        (lambda: EngineError(message="ticket revoked"), 1),  # not retryable: one attempt
    ],
    ids=["transient-every-time", "not-retryable"],
)
async def test_failing_read_fails_the_job_and_commits_nothing(
    rig: Rig, error: Callable[[], Exception], attempts: int, tmp_path: Path
) -> None:
    full = await rig.backup("full")
    assert full.manifest is not None
    (parent,) = rig.os.bitmaps
    rig.os.write(slot(2), b"w" * 10)
    rig.os.before_read, calls = fail_reads(slot(2), 10**6, error)
    outcome = await rig.backup("incremental")
    record = outcome.record
    assert record.state is State.FAILED
    assert record.error is not None
    assert f"disk disk-os at offset {slot(2)}" in record.error
    assert len(calls) == attempts
    assert outcome.manifest is None
    assert [s.snapshot_id for s in rig.store.snapshots()] == [full.manifest.snapshot_id]
    assert not list(rig.store.layout.snapshots.glob("*/*.tmp"))
    failed = rig.vm.sessions[-1]
    assert failed.closed == [False]
    assert list(rig.os.bitmaps) == [parent]  # the failed run's checkpoint is gone
    assert rig.vm.open_readers == 0

    rig.os.before_read = None
    rig.os.write(slot(9), b"v" * 10)
    after = await rig.backup("incremental")
    assert after.record.state is State.SUCCEEDED, after.record.error
    assert after.manifest is not None
    assert after.manifest.parent == full.manifest.snapshot_id
    assert slots_read(rig.os) == {2, 9}
    await rig.assert_restores(after.manifest, rig.contents())


async def test_cancelled_backup_commits_nothing_and_cleans_up(rig: Rig) -> None:
    reading = asyncio.Event()

    async def hang(disk: MemoryDisk, offset: int, length: int) -> None:
        if offset == slot(8):
            reading.set()
            await asyncio.Event().wait()

    rig.os.before_read = hang
    task = asyncio.create_task(rig.backup("full", job_id="cancelled-backup"))
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.journal.load("cancelled-backup").state is State.CANCELLED
    assert rig.store.snapshots() == []
    (session,) = rig.vm.sessions
    assert session.closed == [False]
    assert rig.os.bitmaps == {} and rig.blank.bitmaps == {}
    assert rig.vm.open_readers == 0

    rig.os.before_read = None
    outcome = await rig.backup("full")
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert outcome.manifest is not None
    await rig.assert_restores(outcome.manifest, rig.contents())


async def test_failed_restore_write_publishes_nothing(rig: Rig) -> None:
    outcome = await rig.backup("full")
    assert outcome.manifest is not None
    targets = MemoryTargets()

    async def refuse(disk: MemoryTargetDisk, offset: int, length: int) -> None:
        if offset == slot(25):
            raise OSError(5, "Input/output error")

    targets.before_write = refuse
    restored, _ = await rig.restore(outcome.manifest, targets)
    assert restored.record.state is State.FAILED
    assert restored.record.error is not None and "Input/output error" in restored.record.error
    assert restored.record.error.startswith("disk web01_os (disk-os): ")
    assert "disk-os" in targets.discarded
    # The blank disk, restored beside it, has nothing to write on a fresh target: it may
    # have been published before the failure (as a finished local image stays), else it
    # was cancelled and discarded; never half of it.
    assert "disk-os" not in targets.published
    assert targets.published in ({}, {"disk-blank": bytes(BLANK_SLOTS * CHUNK)})
    assert all(d.open_writers == 0 for d in targets.disks)


async def test_cancelled_restore_publishes_nothing(rig: Rig) -> None:
    outcome = await rig.backup("full")
    assert outcome.manifest is not None
    targets = MemoryTargets()
    writing = asyncio.Event()

    async def hang(disk: MemoryTargetDisk, offset: int, length: int) -> None:
        if offset == slot(30):
            writing.set()
            await asyncio.Event().wait()

    targets.before_write = hang
    task = asyncio.create_task(rig.restore(outcome.manifest, targets, job_id="cancelled"))
    await writing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.journal.load("cancelled").state is State.CANCELLED
    assert "disk-os" not in targets.published and "disk-os" in targets.discarded
    assert targets.published in ({}, {"disk-blank": bytes(BLANK_SLOTS * CHUNK)})
    assert all(d.open_writers == 0 for d in targets.disks)

    # The store is untouched: the snapshot restores.
    await rig.assert_restores(outcome.manifest, rig.contents())


# --- several disks at once (``run_restore``'s ``disks_at_once``) ------------------------------

# Long enough for any restore of these small disks; reached only when the disks never meet.
MEET_TIMEOUT = 30.0


async def test_disks_are_written_at_once_and_made_in_manifest_order(rig: Rig) -> None:
    """Each disk's first write waits until the other disk has a write in flight: only a
    restore that writes both at once gets past it (one at a time, it would wait forever)."""
    outcome = await rig.backup("full")
    assert outcome.manifest is not None
    targets = MemoryTargets()
    targets.fresh = False  # the blank disk's zero slots are written too: both disks write
    writing: set[str] = set()
    both = asyncio.Event()

    async def meet(disk: MemoryTargetDisk, offset: int, length: int) -> None:
        writing.add(disk.info.disk_id)
        if len(writing) == 2:
            both.set()
        await both.wait()

    targets.before_write = meet
    progress: dict[str, list[tuple[int, int]]] = {}

    def report(disk: str, done: int, total: int) -> None:
        progress.setdefault(disk, []).append((done, total))

    async with asyncio.timeout(MEET_TIMEOUT):
        restored, _ = await rig.restore(
            outcome.manifest, targets, disks_at_once=2, progress=report, job_id="at-once"
        )
    assert restored.record.state is State.SUCCEEDED, restored.record.error
    assert targets.published == rig.contents()
    assert [d.info.disk_id for d in targets.disks] == ["disk-os", "disk-blank"]  # made in order
    assert rig.journal.load("at-once").resources["memory_targets"] == ["disk-os", "disk-blank"]
    assert [s.disk_id for s in restored.disks] == ["disk-os", "disk-blank"]
    for disk in rig.vm.disks:  # each disk reported under its own name, from 0 to its size
        assert progress[disk.name][0] == (0, disk.size)
        assert progress[disk.name][-1] == (disk.size, disk.size)


async def test_one_disk_at_a_time_never_overlaps(rig: Rig) -> None:
    outcome = await rig.backup("full")
    assert outcome.manifest is not None
    targets = MemoryTargets()
    targets.fresh = False
    open_targets: list[str] = []
    most = 0

    @contextlib.asynccontextmanager
    async def counted(entry: DiskEntry, record: ResourceRecorder) -> AsyncIterator[TargetDisk]:
        nonlocal most
        async with targets.make_target(entry, record) as disk:
            open_targets.append(entry.disk_id)
            most = max(most, len(open_targets))
            try:
                yield disk
            finally:
                open_targets.remove(entry.disk_id)

    restored = await run_restore(
        store=rig.store,
        pool=rig.pool,
        snapshot_id=outcome.manifest.snapshot_id,
        disks=None,
        plugin="memory",
        make_target=counted,
        journal=rig.journal,
        disks_at_once=1,
    )
    assert restored.record.state is State.SUCCEEDED, restored.record.error
    assert targets.published == rig.contents()
    assert most == 1


async def test_a_failing_disk_cancels_the_other_and_names_itself(rig: Rig) -> None:
    """The blank disk fails while the OS disk is in the middle of a write that never ends by
    itself: the job fails naming the blank disk, the OS disk's write is cancelled, and
    neither disk is published."""
    outcome = await rig.backup("full")
    assert outcome.manifest is not None
    targets = MemoryTargets()
    targets.fresh = False
    os_writing = asyncio.Event()

    async def hook(disk: MemoryTargetDisk, offset: int, length: int) -> None:
        if disk.info.disk_id == "disk-os":
            os_writing.set()
            await asyncio.Event().wait()  # ends only by cancellation
        await os_writing.wait()
        raise OSError(5, "Input/output error")

    targets.before_write = hook
    async with asyncio.timeout(MEET_TIMEOUT):
        restored, _ = await rig.restore(outcome.manifest, targets, disks_at_once=2)
    record = restored.record
    assert record.state is State.FAILED
    assert record.error is not None
    assert record.error.startswith("disk web01_blank (disk-blank): "), record.error
    assert "Input/output error" in record.error
    assert targets.published == {}
    assert sorted(targets.discarded) == ["disk-blank", "disk-os"]
    assert all(d.open_writers == 0 for d in targets.disks)
    assert restored.disks == []


async def test_an_integrity_error_of_one_disk_stays_one(rig: Rig) -> None:
    """Naming the disk keeps the error's class: a corrupt record fails the job as an
    integrity failure (never retried, alerts), with the disk in front of the chunk."""
    outcome = await rig.backup("full")
    assert outcome.manifest is not None

    async def corrupt(buf: object, chunk_id: bytes, fetch: object) -> memoryview:
        raise CorruptRecord(chunk="c0ffee", pack="p", offset=0, reason="bad tag")

    rig.pool.fetch_decode = corrupt  # type: ignore[method-assign]
    restored, _ = await rig.restore(outcome.manifest, disks_at_once=2)
    assert restored.record.state is State.FAILED
    assert restored.record.integrity
    assert restored.record.error is not None
    assert restored.record.error.startswith("disk web01_os (disk-os): corrupt record")
