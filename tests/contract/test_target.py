"""The Target contract: every implementation runs these tests through the ``target`` fixture.

What ``engine.restore`` and the restore job rely on (``engine.sources.types``, ``MakeTarget``
of ``engine.jobs.restore``): ``make_target(entry, record)`` journals what it creates before
the disk is handed out and gives a fresh ``TargetDisk`` at least ``entry.size`` bytes large
that reads as zeroes; data written (bytes or memoryviews, at slot offsets and a short last
slot) and zeroes written over data are exactly what the disk holds once the context is left
normally, also when several writers write at once; a write past the disk's end is refused.
Leaving the context by an exception or a cancellation propagates it unchanged and leaves no
disk behind. Finally the restore job writes a snapshot through it byte for byte.

Implementations (``harness.TARGETS``): the in-memory target, new local qcow2 and raw images
(qemu-nbd), new engine disks uploaded through ovirt-imageio in the lab.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from engine.core.ids import ZERO_ID
from engine.core.units import KiB
from engine.jobs.journal import Journal
from engine.jobs.restore import run_restore
from engine.jobs.states import State
from engine.sources.types import DiskWriter
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.workers import ThreadCpuPool
from tests.conftest import StoreFactory
from tests.contract.harness import TARGETS, Recorder, TargetHarness, known_gap
from tests.helpers import realistic_bytes

CHUNK = 64 * KiB
SLOTS = 20
# Not a whole number of chunks: the last slot is short (but whole 512-byte sectors, which
# engine disks are made of).
SIZE = SLOTS * CHUNK + 4608
WRITERS = 4


class Refused(Exception):
    """What a test raises inside a target's context."""


@pytest.fixture(
    params=[
        pytest.param(name, marks=() if name == "memory" else pytest.mark.integration)
        for name in TARGETS
    ]
)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TargetHarness]:
    known_gap(request, request.param)
    async with TARGETS[request.param](tmp_path) as harness:
        yield harness


def slot(i: int) -> int:
    return i * CHUNK


def last_slot_length() -> int:
    return SIZE - slot(SLOTS)


async def close_all(writers: Sequence[DiskWriter]) -> None:
    for writer in writers:
        await writer.flush()
    for writer in writers:
        await writer.close()


async def test_new_disk_is_fresh_zeroes_and_journaled_first(target: TargetHarness) -> None:
    entry = target.entry("fresh", SIZE)
    recorder = Recorder()
    async with target.make_target(entry, recorder) as disk:
        assert recorder.keys, "a target journals what it creates before handing it out"
        assert disk.info.size >= entry.size
        assert disk.info.name == entry.name
        assert disk.fresh, "a new sparse disk: zero slots need no write"
        writer = await disk.open_writer()
        await close_all([writer])
    assert await target.read_back(entry) == bytes(SIZE)
    assert await target.leftovers() == []


async def test_written_bytes_and_zeroes_are_what_the_disk_holds(target: TargetHarness) -> None:
    entry = target.entry("written", SIZE)
    expected = bytearray(SIZE)

    def put(offset: int, data: bytes) -> bytes:
        expected[offset : offset + len(data)] = data
        return data

    async with target.make_target(entry, Recorder()) as disk:
        writer = await disk.open_writer()
        await writer.write(0, put(0, realistic_bytes(CHUNK, seed=1)))
        await writer.write(slot(3), put(slot(3), os.urandom(CHUNK)))
        await writer.write(slot(7), memoryview(put(slot(7), os.urandom(CHUNK))))
        await writer.write(slot(SLOTS), put(slot(SLOTS), os.urandom(last_slot_length())))
        # zeroes over data, and over a range never written
        await writer.write_zeroes(slot(3) + 4096, 8192)
        put(slot(3) + 4096, bytes(8192))
        await writer.write_zeroes(slot(10), 2 * CHUNK)
        await close_all([writer])
    assert await target.read_back(entry) == expected
    assert await target.leftovers() == []


async def test_concurrent_writers_each_write_their_slots(target: TargetHarness) -> None:
    entry = target.entry("concurrent", SIZE)
    data = realistic_bytes(SIZE, seed=2)
    async with target.make_target(entry, Recorder()) as disk:
        writers = [await disk.open_writer() for _ in range(WRITERS)]

        async def write(writer: DiskWriter, slots: range) -> None:
            for i in slots:
                start = slot(i)
                await writer.write(start, data[start : start + CHUNK])

        async with asyncio.TaskGroup() as tg:
            for n, writer in enumerate(writers):
                tg.create_task(write(writer, range(n, SLOTS + 1, WRITERS)))
        await close_all(writers)
    assert await target.read_back(entry) == data
    assert await target.leftovers() == []


async def test_write_past_the_end_is_refused(target: TargetHarness) -> None:
    entry = target.entry("short", SIZE)
    with pytest.raises(Refused):
        async with target.make_target(entry, Recorder()) as disk:
            writer = await disk.open_writer()
            try:
                with pytest.raises(Exception):  # noqa: B017 - each implementation its own
                    await writer.write(disk.info.size, b"x" * 512)
            finally:
                await writer.close()
            raise Refused
    assert await target.left(entry) == []
    assert await target.leftovers() == []


async def test_failure_propagates_and_leaves_no_disk(target: TargetHarness) -> None:
    entry = target.entry("failed", SIZE)
    error = Refused("the restore failed")
    with pytest.raises(Refused) as caught:
        async with target.make_target(entry, Recorder()) as disk:
            writer = await disk.open_writer()
            await writer.write(0, os.urandom(CHUNK))
            await writer.close()
            raise error
    assert caught.value is error
    assert await target.left(entry) == []
    assert await target.leftovers() == []


async def test_cancellation_propagates_and_leaves_no_disk(target: TargetHarness) -> None:
    entry = target.entry("cancelled", SIZE)
    writing = asyncio.Event()

    async def restore() -> None:
        async with target.make_target(entry, Recorder()) as disk:
            writer = await disk.open_writer()
            try:
                await writer.write(slot(1), os.urandom(CHUNK))
                writing.set()
                await asyncio.Event().wait()  # cancelled here
            finally:
                await writer.close()

    task = asyncio.create_task(restore())
    await writing.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await target.left(entry) == []
    assert await target.leftovers() == []


def snapshot(store: Store, disks: Sequence[tuple[DiskEntry, bytes]]) -> Manifest:
    """Commit a snapshot of ``disks`` (entry attributes kept: the target may need them)."""
    size = store.config.chunk_size
    with store.begin_snapshot(vm_id="vm-contract", vm_name="contract", level="full") as snap:
        for entry, data in disks:
            dm = snap.add_disk(entry.disk_id, entry.name, len(data), dict(entry.attributes))
            for i, start in enumerate(range(0, len(data), size)):
                piece = data[start : start + size]
                dm.set(i, ZERO_ID if not any(piece) else store.put_chunk(piece))
        return snap.commit()


async def test_restore_job_writes_a_snapshot_through_the_target(
    target: TargetHarness, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=CHUNK)
    block = realistic_bytes(CHUNK, seed=3)
    data = realistic_bytes(4 * CHUNK, seed=4) + bytes(5 * CHUNK) + block * 4 + os.urandom(4608)
    disks = [(target.entry("os", len(data)), data), (target.entry("empty", 3 * CHUNK), None)]
    manifest = snapshot(store, [(e, d if d is not None else bytes(e.size)) for e, d in disks])
    pool = ThreadCpuPool(store.keys, CHUNK, workers=2, capacity=8)
    try:
        outcome = await run_restore(
            store=store,
            pool=pool,
            snapshot_id=manifest.snapshot_id,
            disks=None,
            plugin="contract",
            make_target=target.make_target,
            journal=Journal(store.path / "journal"),
            writers=WRITERS,
        )
    finally:
        await pool.aclose()
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    for entry, expected in disks:
        restored = await target.read_back(entry)
        assert restored == (expected if expected is not None else bytes(entry.size)), entry.name
    assert await target.leftovers() == []
