"""The Source contract: every implementation runs these tests through the ``source`` fixture.

What the backup job and pipeline rely on (``engine.sources``): an open session describes
the VM and its disks (sizes, ids, a full read without reasons when no parent is given),
allocation extents cover any range asked exactly and mark zero only what reads as zero,
readers return the disk's bytes at any offset and length (also several readers at once),
``release`` is idempotent and ``close`` frees everything (also for disks never read or
released). From an intact checkpoint, the disks that keep checkpoints read incrementally and
their dirty extents cover every byte written since; the others, and every disk when the
checkpoint is unknown, read in full with a reason. A failed session leaves its parent
checkpoint usable; a successful one keeps the checkpoints it was asked to keep and drops
older ones. Everything journaled is JSON. Finally the backup job itself runs on the
source: a full and an incremental restore to exactly what the disks held.

Implementations (``harness.SOURCES``): the in-memory source, local images (a qcow2 one
through qemu-nbd and a raw one read directly; and raw images only, no process at all), the
oVirt backup-API flow, the snapshot + imageio flow and the snapshot + DataMover attachment
flow (its devices read directly) against the lab.
"""

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from engine.core.extent import Extent
from engine.core.units import KiB, MiB
from engine.jobs.backup import run_backup
from engine.jobs.journal import Journal
from engine.jobs.states import State
from engine.sources.types import BackupSession, SourceDisk
from engine.util.retry import RetryPolicy
from engine.workers import ThreadCpuPool
from tests.conftest import StoreFactory
from tests.contract.harness import (
    CHECKPOINTED,
    DIRTY_GRANULARITY,
    LAYOUT,
    SOURCES,
    Recorder,
    SourceHarness,
    Write,
)
from tests.helpers import read_disk

CHUNK = 64 * KiB
READERS = 3
CONSISTENCY = {"application", "crash", "offline", None}

W1 = (
    Write(0, 1001, 3333, 0x42),  # inside data, unaligned
    Write(0, 2 * MiB + 5, 70_000, 0x43),  # in the zero run, across clusters
    Write(0, LAYOUT[0].size - 10, 10, 0x44),  # the last bytes
    Write(1, 4096, 5000, 0x45),  # the disk without checkpoints
)
W2 = (Write(0, 4 * MiB + 123, 999, 0x46), Write(1, 1 * MiB, 1, 0x47))


def implementations(names: Sequence[str]) -> list[object]:
    return [
        pytest.param(name, marks=() if name == "memory" else pytest.mark.integration)
        for name in names
    ]


@pytest.fixture(params=implementations(list(SOURCES)))
async def source(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SourceHarness]:
    async with SOURCES[request.param](tmp_path) as harness:
        yield harness


@pytest.fixture(params=implementations(CHECKPOINTED))
async def checkpointed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[SourceHarness]:
    """The sources whose sessions keep checkpoints."""
    async with SOURCES[request.param](tmp_path) as harness:
        assert harness.checkpoints
        yield harness


def checkpoint_name() -> str:
    return f"tessera-{uuid.uuid4().hex[:12]}"


async def open_session(
    h: SourceHarness,
    parent: str | None = None,
    keep: Sequence[str] = (),
    recorder: Recorder | None = None,
) -> BackupSession:
    record = recorder if recorder is not None else Recorder()
    return await h.source.open(parent, keep, checkpoint_name(), READERS, record)


async def checkpoint_after_full(h: SourceHarness) -> str:
    """A full session, closed successfully: its checkpoint."""
    session = await open_session(h)
    await session.close(success=True)
    assert session.checkpoint is not None
    return session.checkpoint


def assert_covers(extents: Sequence[Extent], offset: int, length: int) -> None:
    """Sorted, contiguous, exactly ``[offset, offset + length)``, neighbours merged."""
    assert extents, f"no extents for [{offset}, {offset + length})"
    pos = offset
    for i, e in enumerate(extents):
        assert e.start == pos, f"extent {i} starts at {e.start}, expected {pos}: {extents}"
        assert e.length > 0
        if i:
            assert not extents[i - 1].same_flags(e), f"extents {i - 1} and {i} not merged"
        pos = e.end
    assert pos == offset + length, f"extents end at {pos}, not {offset + length}"


def dirty_ranges(writes: Sequence[Write], disk: int) -> list[tuple[int, int]]:
    return [(w.offset, w.offset + w.length) for w in writes if w.disk == disk]


async def read(disk: SourceDisk, offset: int, length: int) -> bytes:
    reader = await disk.open_reader()
    try:
        buf = bytearray(length)
        await reader.readinto(offset, memoryview(buf))
        return bytes(buf)
    finally:
        await reader.close()


async def read_all(disk: SourceDisk, piece: int = 1 * MiB) -> bytes:
    reader = await disk.open_reader()
    try:
        out = bytearray(disk.info.size)
        view = memoryview(out)
        for offset in range(0, disk.info.size, piece):
            await reader.readinto(offset, view[offset : offset + piece])
        return bytes(out)
    finally:
        await reader.close()


async def test_session_describes_the_vm_and_its_disks(source: SourceHarness) -> None:
    expected = await source.expected()
    recorder = Recorder()
    session = await open_session(source, recorder=recorder)
    try:
        vm = session.vm
        assert (vm.vm_id, vm.name) == (source.source.vm_id, source.source.vm_name)
        assert [d.info for d in session.disks] == list(vm.disks)
        assert len(vm.disks) == len(LAYOUT)
        assert all(d.name for d in vm.disks)
        assert [d.size for d in vm.disks] == [len(e) for e in expected]
        assert len({d.disk_id for d in vm.disks}) == len(LAYOUT)
        for disk in session.disks:
            assert disk.checkpoint_parent is None, "no parent was asked for"
            assert disk.fallback_reason is None, "a full read was asked for"
        assert session.consistency in CONSISTENCY
        if vm.config is not None:
            assert vm.config_format
        assert not vm.skipped
        # A source journals what it creates before creating it; one that creates nothing
        # journals nothing.
        assert bool(recorder.keys) == source.journals, recorder.keys
    finally:
        await session.close(success=True)
    assert (session.checkpoint is not None) == source.checkpoints
    assert await source.leftovers() == []


async def test_extents_cover_any_range_and_zero_reads_as_zero(source: SourceHarness) -> None:
    expected = await source.expected()
    session = await open_session(source)
    try:
        for disk, data, layout in zip(session.disks, expected, LAYOUT, strict=True):
            size = disk.info.size
            windows = [(0, size), (CHUNK, 3 * CHUNK), (5000, 3 * CHUNK + 7), (size - 700, 700)]
            for offset, length in windows:
                extents = await disk.extents(offset, length)
                assert_covers(extents, offset, length)
                for e in extents:
                    assert not e.dirty, f"allocation extents are never dirty: {e}"
                    if e.zero:
                        assert data[e.start : e.end] == bytes(e.length), f"{e} is not zero"
            if source.reports_zero:
                start, end = layout.zero_run
                zero = [e for e in await disk.extents(0, size) if e.zero]
                covered = sum(max(0, min(e.end, end) - max(e.start, start)) for e in zero)
                assert covered >= end - start, f"{layout.name}: zero run not reported zero"
    finally:
        await session.close(success=True)
    assert await source.leftovers() == []


async def test_readers_return_the_bytes_at_any_offset(source: SourceHarness) -> None:
    expected = await source.expected()
    session = await open_session(source)
    try:
        for disk, data in zip(session.disks, expected, strict=True):
            size = disk.info.size
            ranges = [
                (0, CHUNK),
                (1001, 3333),
                (256 * KiB - 10, 20),  # data into zeros
                (5 * CHUNK, 3 * CHUNK),
                (size - 1000, 1000),
                (size - 1, 1),
            ]
            reader = await disk.open_reader()
            try:
                for offset, length in ranges:  # one connection, many requests
                    buf = bytearray(length)
                    await reader.readinto(offset, memoryview(buf))
                    assert buf == data[offset : offset + length], (disk.info.name, offset)
            finally:
                await reader.close()
            assert await read(disk, 7, 11) == data[7:18]
    finally:
        await session.close(success=True)
    assert await source.leftovers() == []


async def test_concurrent_readers_each_get_their_bytes(source: SourceHarness) -> None:
    expected = await source.expected()
    session = await open_session(source)
    try:
        for disk, data in zip(session.disks, expected, strict=True):
            size = disk.info.size
            slots = list(range(0, size, CHUNK))
            random.Random(7).shuffle(slots)
            out = bytearray(size)

            async def reader(
                share: list[int], disk: SourceDisk = disk, out: bytearray = out
            ) -> None:
                conn = await disk.open_reader()
                try:
                    for offset in share:
                        end = min(offset + CHUNK, disk.info.size)
                        await conn.readinto(offset, memoryview(out)[offset:end])
                finally:
                    await conn.close()

            async with asyncio.TaskGroup() as tg:
                for i in range(READERS):
                    tg.create_task(reader(slots[i::READERS]))
            assert out == data, disk.info.name
    finally:
        await session.close(success=True)
    assert await source.leftovers() == []


async def test_release_is_idempotent_and_close_frees_everything(source: SourceHarness) -> None:
    expected = await source.expected()
    session = await open_session(source)
    first, unread = session.disks
    assert await read(first, 0, 100) == expected[0][:100]
    await first.release()
    await first.release()
    await unread.release()  # never read: releasing it frees nothing, and does not fail
    await unread.release()
    await session.close(success=True)
    assert await source.leftovers() == []

    # A failed job closes without releasing the disk it was reading.
    session = await open_session(source)
    assert await read(session.disks[1], 4096, 100) == expected[1][4096:4196]
    await session.close(success=False)
    assert await source.leftovers() == []


async def assert_incremental(
    h: SourceHarness, session: BackupSession, parent: str, written: Sequence[Write]
) -> None:
    """The disks of ``h.incremental`` read from ``parent``, their dirty extents covering
    every byte of ``written`` (and little more); the others read in full with a reason."""
    for i, disk in enumerate(session.disks):
        name = disk.info.name
        if i not in h.incremental:
            assert disk.checkpoint_parent is None, name
            assert disk.fallback_reason, f"{name}: a full read instead of an incremental says why"
            continue
        assert disk.checkpoint_parent == parent, name
        assert disk.fallback_reason is None, name
        size = disk.info.size
        dirty = await disk.dirty_extents(0, size)
        assert_covers(dirty, 0, size)
        assert all(not e.zero and not e.hole for e in dirty), dirty
        marked = [(e.start, e.end) for e in dirty if e.dirty]
        for start, end in dirty_ranges(written, i):
            pos = start
            for s, e in marked:
                if s <= pos < e:
                    pos = e
            assert pos >= end, f"{name}: bytes [{start}, {end}) written but not dirty: {marked}"
        ranges = dirty_ranges(written, i)
        bound = sum(end - start + 2 * DIRTY_GRANULARITY for start, end in ranges)
        assert sum(e - s for s, e in marked) <= bound, f"{name}: far more dirty than written"
        window = await disk.dirty_extents(CHUNK, 3 * CHUNK + 5)
        assert_covers(window, CHUNK, 3 * CHUNK + 5)


async def test_incremental_reads_what_changed_since_the_checkpoint(
    checkpointed: SourceHarness,
) -> None:
    source = checkpointed
    parent = await checkpoint_after_full(source)
    await source.write(W1)
    expected = await source.expected()
    session = await open_session(source, parent)
    try:
        await assert_incremental(source, session, parent, W1)
        for disk, data in zip(session.disks, expected, strict=True):
            assert await read_all(disk) == data, disk.info.name
    finally:
        await session.close(success=True)
    assert await source.leftovers() == []


async def test_unknown_checkpoint_reads_everything_with_a_reason(source: SourceHarness) -> None:
    expected = await source.expected()
    session = await open_session(source, parent=str(uuid.uuid4()))
    try:
        for disk, data in zip(session.disks, expected, strict=True):
            assert disk.checkpoint_parent is None, disk.info.name
            assert disk.fallback_reason, disk.info.name
            assert await read_all(disk) == data, disk.info.name
    finally:
        await session.close(success=False)
    assert await source.leftovers() == []


async def test_failed_session_leaves_its_parent_usable(checkpointed: SourceHarness) -> None:
    source = checkpointed
    parent = await checkpoint_after_full(source)
    await source.write(W1)
    failed = await open_session(source, parent)
    await read(failed.disks[0], 0, CHUNK)
    await failed.close(success=False)
    await source.write(W2)
    session = await open_session(source, parent)
    try:
        await assert_incremental(source, session, parent, W1 + W2)
    finally:
        await session.close(success=True)
    assert await source.leftovers() == []


async def test_kept_checkpoints_survive_older_ones_are_dropped(checkpointed: SourceHarness) -> None:
    source = checkpointed
    first = await checkpoint_after_full(source)
    await source.write(W1)
    # A differential from the first checkpoint, keeping it (as the job keeps the last full's).
    second = await open_session(source, first, keep=[first])
    await second.close(success=True)
    assert second.checkpoint is not None
    await source.write(W2)
    session = await open_session(source, first, keep=[first])
    await assert_incremental(source, session, first, W1 + W2)
    await session.close(success=True)
    assert session.checkpoint is not None
    # An incremental from the newest, keeping nothing: the older checkpoints go.
    session = await open_session(source, session.checkpoint)
    await session.close(success=True)
    newest = session.checkpoint
    assert newest is not None
    dropped = await open_session(source, first)
    try:
        for disk in dropped.disks:
            assert disk.checkpoint_parent is None, f"{disk.info.name}: {first} was not dropped"
            assert disk.fallback_reason
    finally:
        await dropped.close(success=False)
    session = await open_session(source, newest)
    await assert_incremental(source, session, newest, ())
    await session.close(success=False)
    assert await source.leftovers() == []


async def test_backup_job_stores_what_the_disks_hold(
    source: SourceHarness, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=CHUNK, pack_size=4 * MiB)
    pool = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=8)
    journal = Journal(store.path / "journal")
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.01)
    try:
        states = []
        for writes, level in (((), "full"), (W1, "incremental")):
            await source.write(writes)
            expected = await source.expected()
            outcome = await run_backup(
                store=store,
                pool=pool,
                source=source.source,
                journal=journal,
                level=level,
                readers=READERS,
                retry_policy=policy,
            )
            assert outcome.record.state is State.SUCCEEDED, outcome.record.error
            assert outcome.manifest is not None
            for i, data in enumerate(expected):
                assert read_disk(store, outcome.manifest, i) == data, LAYOUT[i].name
            states.append(outcome)
        incremental = states[-1]
        reads = {d.disk_id: d for d in incremental.disks}
        assert incremental.level == "incremental"
        for i, disk in enumerate(incremental.manifest.disks):  # type: ignore[union-attr]
            read_kind = disk.attributes.get("read")
            if i in source.incremental:
                assert read_kind == "dirty", disk.name
                assert reads[disk.disk_id].clean_slots > 0, disk.name
            else:
                assert read_kind == "full", disk.name
    finally:
        await pool.aclose()
    assert await source.leftovers() == []
