"""The CpuPool contract: every implementation runs these tests through the ``pool`` fixture.

Records made by a pool must be exactly what ``Codec`` makes and reads, bad records must be
refused with an error naming chunk, pack and offset, ``capacity`` must bound the buffers in
flight, and a closed pool must refuse work. The process pool must also survive a worker
that dies and leave no shared memory behind.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import zlib
from collections.abc import AsyncIterator
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.errors import ConfigError, CorruptRecord, WorkerError
from engine.core.ids import ChunkId, short
from engine.store import format as fmt
from engine.store.codec import Codec
from engine.store.keys import StoreKeys
from engine.workers import (
    POOL_KINDS,
    ChunkBuffer,
    CpuPool,
    ProcessCpuPool,
    ThreadCpuPool,
    make_cpu_pool,
)

CHUNK = fmt.MIN_CHUNK_SIZE  # 64 KiB: the smallest chunk the store allows keeps the suite fast
WORKERS = 2  # fixed so that capacity (max(8, 4 × workers) = 8) is the same on every machine
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[True, False], ids=["aes", "unencrypted"])
def keys(request: pytest.FixtureRequest) -> StoreKeys:
    return StoreKeys.generate(encrypted=request.param)


@pytest.fixture(params=POOL_KINDS)
async def pool(request: pytest.FixtureRequest, keys: StoreKeys) -> AsyncIterator[CpuPool]:
    cpu_pool = make_cpu_pool(keys, CHUNK, kind=request.param, workers=WORKERS)
    try:
        yield cpu_pool
    finally:
        await cpu_pool.aclose()


def compressible(n: int) -> bytes:
    return (b"tessera backs up virtual disks " * (n // 31 + 1))[:n]


async def encode(pool: CpuPool, data: bytes) -> tuple[ChunkId, bytes]:
    async with pool.buffer() as buf:
        buf.load(data)
        cid = await pool.chunk_id(buf)
        record = bytes(await pool.encode(buf, cid))
    return cid, record


async def decode(
    pool: CpuPool, record: bytes, cid: ChunkId, pack: str = "?", offset: int = 0
) -> bytes:
    async with pool.buffer() as buf:
        buf.load_record(record)
        return bytes(await pool.decode(buf, cid, pack, offset))


PAYLOADS = {
    "empty": b"",
    "one-byte": b"\x00",
    "short": os.urandom(47),
    "compressible": compressible(CHUNK),
    "incompressible": os.urandom(CHUNK),
    "mixed-partial": compressible(CHUNK // 3) + os.urandom(CHUNK // 3),
}


@pytest.mark.parametrize("name", PAYLOADS)
async def test_records_agree_with_codec(pool: CpuPool, keys: StoreKeys, name: str) -> None:
    data = PAYLOADS[name]
    codec = Codec(keys)
    cid, record = await encode(pool, data)
    assert cid == codec.chunk_id(data)
    assert codec.decode(record, cid) == data
    assert await decode(pool, record, cid) == data
    # and the other way: a record the codec made decodes through the pool
    assert await decode(pool, bytes(codec.encode(data, cid)), cid) == data
    if name == "compressible":
        assert len(record) < len(data) // 10


async def test_producer_fills_plain_directly(pool: CpuPool, keys: StoreKeys) -> None:
    data = os.urandom(1000) + compressible(5000)
    async with pool.buffer() as buf:
        buf.plain[: len(data)] = data  # as recv_into would
        buf.length = len(data)
        cid = await pool.chunk_id(buf)
        record = await pool.encode(buf, cid)
        assert buf.record_length == len(record)
        assert Codec(keys).decode(record, cid) == data
        del record  # views must not outlive the buffer (they are revoked anyway)


@settings(
    max_examples=30,
    deadline=None,
    # The pool is deliberately shared by all examples: starting workers per example is slow.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pattern=st.binary(min_size=1, max_size=64),
    repeats=st.integers(min_value=0, max_value=CHUNK // 64),
    noise=st.binary(max_size=512),
)
async def test_round_trip_property(
    pool: CpuPool, keys: StoreKeys, pattern: bytes, repeats: int, noise: bytes
) -> None:
    data = (noise + pattern * repeats + noise)[:CHUNK]
    cid, record = await encode(pool, data)
    assert cid == Codec(keys).chunk_id(data)
    assert await decode(pool, record, cid) == data


@pytest.mark.parametrize("fix_crc", [False, True], ids=["crc-catches", "content-catches"])
async def test_flipped_byte_is_refused_naming_chunk_pack_offset(
    pool: CpuPool, fix_crc: bool
) -> None:
    data = os.urandom(CHUNK // 2)
    cid, record = await encode(pool, data)
    bad = bytearray(record)
    bad[fmt.RECORD_HEADER.size + 20] ^= 0x01  # inside the payload
    if fix_crc:  # get past the CRC: AES-GCM or the id check must still refuse it
        end = len(bad) - fmt.RECORD_CRC.size
        fmt.RECORD_CRC.pack_into(bad, end, zlib.crc32(bad[:end]))
    async with pool.buffer() as buf:
        buf.load_record(bad)
        with pytest.raises(CorruptRecord) as caught:
            await pool.decode(buf, cid, "pack-00c0ffee", 123456)
        assert buf.length == 0  # no half-decoded plaintext is left to be mistaken for data
    message = str(caught.value)
    assert short(cid) in message
    assert "pack pack-00c0ffee" in message
    assert "offset 123456" in message
    assert caught.value.fields["pack"] == "pack-00c0ffee"  # fields survive the process pipe


async def test_record_of_another_chunk_is_refused(pool: CpuPool) -> None:
    _, record = await encode(pool, compressible(CHUNK))
    other_cid, _ = await encode(pool, b"another chunk")
    with pytest.raises(CorruptRecord, match=f"chunk {short(other_cid)} .*holds chunk"):
        await decode(pool, record, other_cid, "pack-1", 48)


async def test_fetch_decode_reads_then_decodes_and_says_where(pool: CpuPool) -> None:
    """A restore's path: ``fetch`` fills the record (off the event loop where the pool can),
    the plaintext comes back with the pack and offset ``fetch`` read it at; a bad record is
    refused naming them; what ``fetch`` raises comes back as raised."""
    data = compressible(CHUNK // 2) + os.urandom(CHUNK // 4)
    cid, record = await encode(pool, data)
    loop_thread = threading.get_ident()
    fetched_on: list[int] = []

    def fetch(out: memoryview) -> tuple[int, str, int]:
        fetched_on.append(threading.get_ident())
        out[: len(record)] = record
        return len(record), "pack-0000beef", 4096

    async with pool.buffer() as buf:
        plain, pack, offset = await pool.fetch_decode(buf, cid, fetch)
        assert (bytes(plain), pack, offset) == (data, "pack-0000beef", 4096)
        assert (buf.record_length, buf.length) == (len(record), len(data))
    assert fetched_on and fetched_on[0] != loop_thread, "fetch is blocking: never on the loop"

    def fetch_bad(out: memoryview) -> tuple[int, str, int]:
        bad = bytearray(record)
        bad[fmt.RECORD_HEADER.size + 20] ^= 0x01
        out[: len(bad)] = bad
        return len(bad), "pack-0000cafe", 777

    async with pool.buffer() as buf:
        with pytest.raises(CorruptRecord) as caught:
            await pool.fetch_decode(buf, cid, fetch_bad)
        assert buf.length == 0
    assert caught.value.fields["pack"] == "pack-0000cafe" and "offset 777" in str(caught.value)

    def fetch_missing(out: memoryview) -> tuple[int, str, int]:
        raise FileNotFoundError("pack-0000dead is gone")

    async with pool.buffer() as buf:
        with pytest.raises(FileNotFoundError, match="pack-0000dead is gone"):
            await pool.fetch_decode(buf, cid, fetch_missing)


async def test_buffer_waits_while_all_are_held(pool: CpuPool) -> None:
    holders = [pool.buffer() for _ in range(pool.capacity)]
    held = [await holder.__aenter__() for holder in holders]
    assert len({buf.slot for buf in held}) == pool.capacity
    got: asyncio.Queue[int] = asyncio.Queue()

    async def want_one() -> None:
        async with pool.buffer() as buf:
            await got.put(buf.slot)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(want_one())
        # Taking a free buffer never waits on anything but the event loop, so after these
        # loop turns the task would have one if any were free.
        for _ in range(20):
            await asyncio.sleep(0)
        assert got.empty()
        await holders[3].__aexit__(None, None, None)
        assert await asyncio.wait_for(got.get(), timeout=10) == held[3].slot
    for i, holder in enumerate(holders):
        if i != 3:
            await holder.__aexit__(None, None, None)


async def test_cancelled_waiter_loses_no_buffer(pool: CpuPool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.capacity):
            await stack.enter_async_context(pool.buffer())

        async def wait_for_buffer() -> None:
            async with pool.buffer():
                pass

        waiter = asyncio.ensure_future(wait_for_buffer())
        for _ in range(5):
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    # every buffer is free again: all of them can be held at once
    async with contextlib.AsyncExitStack() as stack:
        bufs = [await stack.enter_async_context(pool.buffer()) for _ in range(pool.capacity)]
        assert len({buf.slot for buf in bufs}) == pool.capacity


async def test_cancelled_call_returns_its_buffer(pool: CpuPool, keys: StoreKeys) -> None:
    data = os.urandom(CHUNK)

    async def encode_and_hang() -> None:
        async with pool.buffer() as buf:
            buf.load(data)
            await pool.encode(buf, Codec(keys).chunk_id(data))
            await asyncio.Event().wait()  # cancelled here or during the encode

    task = asyncio.ensure_future(encode_and_hang())
    await asyncio.sleep(0)  # the encode is submitted
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The buffer comes back once the worker is done with it, and every buffer is usable.
    async with asyncio.timeout(30), contextlib.AsyncExitStack() as stack:
        bufs = [await stack.enter_async_context(pool.buffer()) for _ in range(pool.capacity)]
        assert len({buf.slot for buf in bufs}) == pool.capacity
    assert (await encode(pool, data))[0] == Codec(keys).chunk_id(data)


async def test_ingest_encodes_and_puts_a_new_chunk_only(pool: CpuPool, keys: StoreKeys) -> None:
    codec = Codec(keys)
    data = compressible(CHUNK - 5)
    stored: dict[ChunkId, bytes] = {}

    def put(cid: ChunkId, record: memoryview) -> bool:
        if cid in stored:
            return False
        stored[cid] = bytes(record)
        return True

    async with pool.buffer() as buf:
        buf.load(data)
        done = await pool.ingest(buf, lambda cid: False, put)
        assert done.chunk_id == codec.chunk_id(data) and done.written
        assert done.record_length == buf.record_length == len(stored[done.chunk_id])
        assert bytes(buf.record_data) == stored[done.chunk_id]
        assert codec.decode(stored[done.chunk_id], done.chunk_id) == data
        # put found it stored: encoded, not written
        again = await pool.ingest(buf, lambda cid: False, put)
        assert (again.chunk_id, again.written) == (done.chunk_id, False)
        assert again.record_length > 0
        # known: nothing encoded, put never called
        seen: list[ChunkId] = []

        def stored_already(cid: ChunkId) -> bool:
            seen.append(cid)
            return True

        known = await pool.ingest(buf, stored_already, put)
        assert seen == [done.chunk_id]
        assert (known.record_length, known.written, buf.record_length) == (0, False, 0)
    assert len(stored) == 1


async def test_ingest_passes_a_failed_put_on_and_keeps_its_buffers(pool: CpuPool) -> None:
    def full(cid: ChunkId, record: memoryview) -> bool:
        raise OSError(28, "No space left on device")

    for _ in range(pool.capacity + 1):  # a lost buffer would make the last round wait
        async with asyncio.timeout(30), pool.buffer() as buf:
            buf.load(os.urandom(CHUNK))
            with pytest.raises(OSError, match="No space left"):
                await pool.ingest(buf, lambda cid: False, full)


async def test_cancelled_ingest_keeps_its_buffer_until_the_put_is_done(pool: CpuPool) -> None:
    entered, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def slow_put(cid: ChunkId, record: memoryview) -> bool:
        entered.set()
        release.wait(30)
        finished.append(len(bytes(record)))  # the record is still readable: not recycled
        return True

    async def ingest() -> None:
        async with pool.buffer() as buf:
            buf.load(os.urandom(CHUNK))
            await pool.ingest(buf, lambda cid: False, slow_put)

    task = asyncio.ensure_future(ingest())
    await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Every buffer but the one the put still reads can be held; that one comes back after.
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(pool.buffer()) for _ in range(pool.capacity - 1)]
        waiting = asyncio.ensure_future(stack.enter_async_context(pool.buffer()))
        # No clock involved: while the put is held at ``release`` nothing can hand the last
        # buffer back, so a few turns of the loop (the waiter queues up) must leave it waiting.
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done() and not finished
        release.set()
        async with asyncio.timeout(30):
            last = await waiting
        assert finished and len({b.slot for b in [*held, last]}) == pool.capacity


async def test_many_concurrent_round_trips(pool: CpuPool, keys: StoreKeys) -> None:
    count = 100  # well over capacity, so tasks queue for buffers
    assert count > pool.capacity
    payloads = [
        os.urandom(CHUNK // 2) if i % 3 == 0 else compressible(CHUNK - i) + bytes([i])
        for i in range(count)
    ]
    results: dict[int, tuple[ChunkId, bytes, bytes]] = {}

    async def round_trip(i: int) -> None:
        cid, record = await encode(pool, payloads[i])
        results[i] = (cid, record, await decode(pool, record, cid))

    async with asyncio.TaskGroup() as tg:
        for i in range(count):
            tg.create_task(round_trip(i))
    codec = Codec(keys)
    for i, (cid, record, plain) in results.items():
        assert plain == payloads[i]
        assert cid == codec.chunk_id(payloads[i])
        assert codec.decode(record, cid) == payloads[i]
    assert len(results) == count


async def test_views_and_buffers_are_revoked_when_given_back(pool: CpuPool) -> None:
    async with pool.buffer() as buf:
        buf.load(b"x" * 100)
        cid = await pool.chunk_id(buf)
        record = await pool.encode(buf, cid)
        data = buf.data
        stale: ChunkBuffer = buf
    with pytest.raises(ValueError, match="released"):
        record[0]
    with pytest.raises(ValueError, match="released"):
        data[0]
    with pytest.raises(RuntimeError, match="given back"):
        await pool.chunk_id(stale)


async def test_bad_lengths_and_ids_are_refused(pool: CpuPool) -> None:
    async with pool.buffer() as buf:
        with pytest.raises(ValueError, match="does not fit"):
            buf.load(bytes(CHUNK + 1))
        with pytest.raises(ValueError, match="does not fit"):
            buf.load_record(bytes(fmt.max_record_size(CHUNK) + 1))
        buf.length = CHUNK + 1
        with pytest.raises(ValueError, match="length"):
            await pool.chunk_id(buf)
        buf.load(b"abc")
        with pytest.raises(ValueError, match="32 bytes"):
            await pool.encode(buf, ChunkId(b"short id"))


async def test_closed_pool_refuses_work(pool: CpuPool) -> None:
    async with pool.buffer() as held:
        held.load(b"data")
        await pool.aclose()
        with pytest.raises(RuntimeError, match="closed"):
            await pool.chunk_id(held)
    with pytest.raises(RuntimeError, match="closed"):
        async with pool.buffer():
            pass
    await pool.aclose()  # idempotent (and the fixture closes it once more)


def test_unknown_pool_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown CPU pool kind 'gpu'"):
        make_cpu_pool(StoreKeys.generate(encrypted=False), CHUNK, kind="gpu")


@pytest.mark.parametrize(("kind", "cls"), [("thread", ThreadCpuPool), ("process", ProcessCpuPool)])
async def test_factory_builds_each_kind_with_default_capacity(kind: str, cls: type) -> None:
    cpu_pool = make_cpu_pool(StoreKeys.generate(encrypted=False), CHUNK, kind=kind, workers=3)
    try:
        assert isinstance(cpu_pool, cls)
        assert cpu_pool.chunk_size == CHUNK
        assert cpu_pool.capacity == 12  # max(8, 4 × 3)
    finally:
        await cpu_pool.aclose()


# --- process pool only --------------------------------------------------------------------


def kill_workers(pool: ProcessCpuPool) -> None:
    pids = pool.worker_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


async def test_process_pool_survives_a_dead_worker() -> None:
    keys = StoreKeys.generate(encrypted=True)
    # One worker: once it is killed no other worker can finish a task behind the test's back.
    pool = ProcessCpuPool(keys, CHUNK, workers=1, capacity=8)
    arena = pool.arena_name
    try:
        data = compressible(CHUNK)
        cid, record = await encode(pool, data)  # starts the worker

        # 1. killed between tasks: the next task is the one affected
        kill_workers(pool)
        with pytest.raises(WorkerError, match=r"worker process died .*pool was restarted"):
            await encode(pool, data)
        assert pool.restarts == 1
        assert await decode(pool, record, cid) == data

        # 2. killed with tasks in flight: each fails alone, the pool restarts once
        payloads = [os.urandom(CHUNK) for _ in range(pool.capacity)]

        async def killer() -> None:
            # gather() starts its tasks in order: every encode has submitted work by now
            kill_workers(pool)

        *results, _ = await asyncio.gather(
            *(encode(pool, p) for p in payloads), killer(), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, WorkerError)]
        done = [(r, p) for r, p in zip(results, payloads, strict=True) if isinstance(r, tuple)]
        assert len(failed) + len(done) == len(payloads), results
        if not failed:  # every task beat the kill: then the next one is affected
            with pytest.raises(WorkerError):
                await encode(pool, data)
        assert pool.restarts == 2
        for (done_cid, done_record), plain in done:
            assert Codec(keys).decode(done_record, done_cid) == plain
        assert await decode(pool, record, cid) == data
        assert (await encode(pool, data))[0] == cid
    finally:
        await pool.aclose()
    with pytest.raises(FileNotFoundError):
        SharedMemory(name=arena)


def test_process_pool_without_room_in_dev_shm_is_a_config_error() -> None:
    shm = os.statvfs("/dev/shm")
    # Debian (and CI) mount /dev/shm as a sized tmpfs; the test needs that limit to exceed.
    assert shm.f_blocks > 0, "/dev/shm has no size limit: this machine cannot run the test"
    # One buffer more than the whole of /dev/shm holds: tmpfs refuses such an fallocate at
    # once, without allocating anything first.
    too_many = shm.f_blocks * shm.f_frsize // fmt.MAX_CHUNK_SIZE + 1
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ConfigError, match=r"cannot reserve .* shared memory"):
        ProcessCpuPool(StoreKeys.generate(encrypted=False), fmt.MAX_CHUNK_SIZE, capacity=too_many)
    assert set(os.listdir("/dev/shm")) <= before  # the segment was unlinked


TRACKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal
    from engine.core.errors import WorkerError
    from engine.store.keys import StoreKeys
    from engine.workers import ProcessCpuPool

    async def main():
        # -X dev turns on asyncio's debug mode, which also reports any step slower than
        # 0.1 s: on a loaded machine that is noise, not a leak (what this test looks for).
        asyncio.get_running_loop().slow_callback_duration = 3600
        pool = ProcessCpuPool(StoreKeys.generate(encrypted=True), 65536, workers=1)
        try:
            for attempt in range(2):
                async with pool.buffer() as buf:
                    buf.load(os.urandom(1000))
                    cid = await pool.chunk_id(buf)
                    await pool.encode(buf, cid)
                if attempt == 0:
                    for pid in pool.worker_pids():
                        os.kill(pid, signal.SIGKILL)
                    try:
                        async with pool.buffer() as buf:
                            await pool.chunk_id(buf)
                    except WorkerError:
                        pass
        finally:
            await pool.aclose()

    asyncio.run(main())
    """
)


def test_process_pool_leaves_no_warnings_behind() -> None:
    # The resource tracker runs in its own process: its "leaked shared_memory" warnings and
    # tracebacks never reach pytest, so a child interpreter's stderr is checked instead.
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", TRACKER_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
