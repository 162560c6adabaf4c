"""The NBD client and the qemu wrappers against real qemu-img, qemu-io and qemu-nbd.

Images are written with qemu-io before qemu-nbd opens them (qemu-nbd holds the image lock),
read back through NBD, and compared with a model built in Python.
"""

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.extent import Extent
from engine.core.units import KiB, MiB
from engine.io import qemu
from engine.io.exports import stop_exports
from engine.io.nbd import connect, extents
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import (
    EINVAL,
    NbdConnectionError,
    NbdOptionError,
    NbdRequestError,
)
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

BITMAP = "b1"
DIRTY = p.DIRTY_BITMAP_PREFIX + BITMAP


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every server started by a test is reaped by the end (zombies count)."""
    processes = leaks.children()
    yield
    assert leaks.children() <= processes


async def run(*argv: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def qemu_io(fmt: str, path: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    await run(*args, path)


def assert_gone(pid: int) -> None:
    """The process has exited and was reaped (a zombie would still accept signal 0)."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_read_back_what_qemu_io_wrote(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"disk.{fmt}"
    await qemu.create(image, fmt, 8 * MiB)
    await qemu_io(
        fmt, image, "write -P 0xab 1M 64k", "write -P 0xcd 5M 4k", "write -P 0x11 8188k 4k"
    )
    model = bytearray(8 * MiB)
    model[1 * MiB : 1 * MiB + 64 * KiB] = b"\xab" * (64 * KiB)
    model[5 * MiB : 5 * MiB + 4 * KiB] = b"\xcd" * (4 * KiB)
    model[8188 * KiB :] = b"\x11" * (4 * KiB)

    async with qemu.QemuNbd(image, fmt, read_only=True) as server:
        async with await connect(server.address) as client:
            assert client.export_size == 8 * MiB
            assert client.read_only
            assert client.structured
            assert await client.read(1 * MiB, 64 * KiB) == b"\xab" * (64 * KiB)
            assert await client.read(1 * MiB - 10, 20) == bytes(10) + b"\xab" * 10
            assert await client.read(0, 8 * MiB) == model

            buf = bytearray(b"\xee" * (3 * MiB))
            await client.readinto(4 * MiB, memoryview(buf)[1 * MiB :])
            assert buf[: 1 * MiB] == b"\xee" * MiB
            assert buf[1 * MiB :] == model[4 * MiB : 6 * MiB]


async def test_reads_larger_than_a_request_are_split(tmp_path: Path) -> None:
    image = tmp_path / "big.raw"
    await qemu.create(image, "raw", 48 * MiB)
    await qemu_io("raw", image, "write -P 0x5a 31M 2M", "write -P 0x77 47M 1M")
    async with qemu.QemuNbd(image, "raw", read_only=True) as server:
        async with await connect(server.address) as client:
            assert client.max_request == p.MAX_REQUEST
            buf = bytearray(48 * MiB)
            await client.readinto(0, memoryview(buf))
    expected = bytearray(48 * MiB)
    expected[31 * MiB : 33 * MiB] = b"\x5a" * (2 * MiB)
    expected[47 * MiB :] = b"\x77" * MiB
    assert buf == expected


async def test_concurrent_reads_on_one_connection(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await qemu.create(image, "qcow2", 16 * MiB)
    await qemu_io("qcow2", image, *(f"write -P {i} {i}M 1M" for i in range(16)))
    async with qemu.QemuNbd(image, "qcow2", read_only=True) as server:
        async with await connect(server.address) as client:

            async def check(i: int) -> None:
                buf = bytearray(256 * KiB)
                await client.readinto(i * MiB + 512 * KiB, memoryview(buf))
                assert buf == bytes([i]) * (256 * KiB)

            async with asyncio.TaskGroup() as tg:
                for _ in range(4):
                    for i in range(16):
                        tg.create_task(check(i))


async def test_block_status_raw_sparse(tmp_path: Path) -> None:
    image = tmp_path / "sparse.raw"
    await qemu.create(image, "raw", 4 * MiB)
    await qemu_io("raw", image, "write -P 0xab 1M 64k", "write -z 2M 64k", "write -P 0 3M 64k")
    async with qemu.QemuNbd(image, "raw", read_only=True) as server:
        async with await connect(server.address) as client:
            found = [e async for e in extents(client, 0, client.export_size)]
    # qemu allocates the first 4 KiB of a raw image it creates (to probe alignment); written
    # zeroes are data (nothing detects them), and "write -z" punched a hole.
    assert found == [
        Extent(0, 4 * KiB),
        Extent(4 * KiB, 1020 * KiB, zero=True, hole=True),
        Extent(1 * MiB, 64 * KiB),
        Extent(1 * MiB + 64 * KiB, 1984 * KiB, zero=True, hole=True),
        Extent(3 * MiB, 64 * KiB),
        Extent(3 * MiB + 64 * KiB, 960 * KiB, zero=True, hole=True),
    ]


async def test_block_status_qcow2_unallocated_and_zero_clusters(tmp_path: Path) -> None:
    image = tmp_path / "sparse.qcow2"
    await qemu.create(image, "qcow2", 4 * MiB)
    await qemu_io("qcow2", image, "write -P 0xab 1M 64k", "write -z 2M 64k")
    assert (await qemu.info(image, fmt="qcow2"))["virtual-size"] == 4 * MiB
    async with qemu.QemuNbd(image, "qcow2", read_only=True) as server:
        async with await connect(server.address) as client:
            found = [e async for e in extents(client, 0, client.export_size)]
            window = await client.block_status(1 * MiB + 4 * KiB, 8 * KiB)
    # An unallocated cluster and a zero cluster ("write -z", allocated in the L2 table as
    # zero) look the same over NBD: HOLE|ZERO, merged into one extent.
    assert found == [
        Extent(0, 1 * MiB, zero=True, hole=True),
        Extent(1 * MiB, 64 * KiB),
        Extent(1 * MiB + 64 * KiB, 3 * MiB - 64 * KiB, zero=True, hole=True),
    ]
    assert window == [Extent(1 * MiB + 4 * KiB, 8 * KiB)]  # clipped to what was asked


async def test_dirty_bitmap_reports_exactly_the_writes(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await qemu.create(image, "qcow2", 8 * MiB)
    await qemu_io("qcow2", image, "write -P 1 0 4M")  # before the bitmap: never dirty
    await qemu.bitmap_add(image, BITMAP)
    assert await qemu.bitmaps(image) == [BITMAP]
    # qemu-io opens the image read-write with its persistent bitmaps enabled: its writes
    # are recorded (granularity 64 KiB), zero writes and small writes included.
    await qemu_io("qcow2", image, "write -P 2 1M 64k", "write -z 3M 128k", "write -P 3 5124k 512")
    async with qemu.QemuNbd(image, "qcow2", read_only=True, bitmap=BITMAP) as server:
        assert server.meta_contexts == (p.BASE_ALLOCATION, DIRTY)
        async with await connect(server.address, meta_contexts=server.meta_contexts) as client:
            assert set(client.contexts) == {p.BASE_ALLOCATION, DIRTY}
            dirty = [e async for e in extents(client, 0, client.export_size, DIRTY)]
            allocation = [e async for e in extents(client, 0, client.export_size)]
            assert await client.read(5124 * KiB, 512) == b"\x03" * 512
    assert [(e.start, e.length) for e in dirty if e.dirty] == [
        (1 * MiB, 64 * KiB),
        (3 * MiB, 128 * KiB),
        (5 * MiB, 64 * KiB),  # one granule around the 512-byte write
    ]
    assert sum(e.length for e in dirty) == 8 * MiB
    assert not any(e.zero or e.hole for e in dirty)
    assert not any(e.dirty for e in allocation)
    assert Extent(3 * MiB, 128 * KiB, zero=True, hole=True) in allocation

    await qemu.bitmap_remove(image, BITMAP)
    assert await qemu.bitmaps(image) == []


async def test_missing_bitmap_is_absent_not_an_error(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    await qemu.create(image, "qcow2", 1 * MiB)
    async with qemu.QemuNbd(image, "qcow2", read_only=True) as server:
        contexts = (p.BASE_ALLOCATION, p.DIRTY_BITMAP_PREFIX + "nope")
        async with await connect(server.address, meta_contexts=contexts) as client:
            assert set(client.contexts) == {p.BASE_ALLOCATION}
            with pytest.raises(ValueError, match="not negotiated"):
                await client.block_status(0, MiB, p.DIRTY_BITMAP_PREFIX + "nope")


async def test_writes_zeroes_and_flush_then_compare(tmp_path: Path) -> None:
    size = 40 * MiB
    target = tmp_path / "target.qcow2"
    await qemu.create(target, "qcow2", size)
    expected = bytearray(size)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    async with qemu.QemuNbd(target, "qcow2", cache="writeback") as server:
        async with await connect(server.address) as client:
            assert client.can_zero
            assert client.can_flush
            assert not client.read_only
            big = chunk * 34  # larger than one request: split into two
            await client.write(2 * MiB, big)
            expected[2 * MiB : 36 * MiB] = big
            await client.write_zeroes(4 * MiB, 8 * MiB)
            expected[4 * MiB : 12 * MiB] = bytes(8 * MiB)
            await client.write_zeroes(20 * MiB + 512, 4096, no_hole=True)
            expected[20 * MiB + 512 : 20 * MiB + 4608] = bytes(4096)
            await asyncio.gather(
                client.write(37 * MiB, b"x" * 1000), client.write(38 * MiB + 1, b"y" * 3)
            )
            expected[37 * MiB : 37 * MiB + 1000] = b"x" * 1000
            expected[38 * MiB + 1 : 38 * MiB + 4] = b"yyy"
            await client.flush()
            assert await client.read(0, size) == expected
            zeroed = await client.block_status(4 * MiB, 8 * MiB)
            assert all(e.zero for e in zeroed)
    reference = tmp_path / "expected.raw"
    reference.write_bytes(expected)
    await run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", target, reference)


async def test_server_error_reply_names_the_request(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    await qemu.create(image, "raw", 1 * MiB)
    async with qemu.QemuNbd(image, "raw", read_only=True) as server:
        async with await connect(server.address) as client:
            with pytest.raises(NbdRequestError) as info:
                await client.read(1 * MiB - 512, 4096)
            error = info.value
            assert error.errno == EINVAL
            assert not error.retryable
            assert "READ offset=1048064 length=4096" in str(error)
            assert "EINVAL" in str(error)
            with pytest.raises(NbdRequestError) as info:
                await client.write(0, b"no")
            # The spec says EPERM; qemu-nbd answers EINVAL "Export is read-only".
            assert info.value.errno == EINVAL
            assert "read-only" in str(info.value)
            assert await client.read(0, 512) == bytes(512)  # the connection is still fine


async def test_unknown_export_name_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    await qemu.create(image, "raw", 1 * MiB)
    async with qemu.QemuNbd(image, "raw", read_only=True, export_name="sda") as server:
        with pytest.raises(NbdOptionError, match="'other'"):
            await connect(server.address, "other")
        async with await connect(server.address, "sda") as client:
            assert client.export_name == "sda"


async def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    await qemu.create(image, "raw", 1 * MiB)
    server = qemu.QemuNbd(image, "raw")
    await server.start()
    pid = server.pid
    socket_dir = server.address.parent
    assert pid is not None
    client = await connect(server.address)
    await server.stop()  # with a client still connected
    assert_gone(pid)
    assert not socket_dir.exists()
    assert server.pid is None
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.address
    with pytest.raises(NbdConnectionError):
        await client.read(0, 512)
    await client.close()
    await server.stop()  # idempotent


async def test_prepare_makes_the_directory_before_the_process(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    await qemu.create(image, "raw", 1 * MiB)
    server = qemu.QemuNbd(image, "raw", base_dir=tmp_path)
    workdir = server.prepare()
    assert workdir.is_dir() and workdir.name.startswith(qemu.WORKDIR_PREFIX)
    assert server.prepare() == workdir and server.pid is None  # idempotent, nothing runs
    await server.start()
    assert server.address.parent == workdir == server.workdir
    await server.stop()
    assert not workdir.exists() and server.workdir is None
    never_started = qemu.QemuNbd(image, "raw", base_dir=tmp_path)
    unused = never_started.prepare()
    await never_started.stop()  # a prepared server that never ran leaves nothing either
    assert not unused.exists()


async def test_recovery_finds_an_unrecorded_server_by_its_directory(tmp_path: Path) -> None:
    """Only the directory was journaled (the owner died before it learnt the pid): the server
    is found by it and stopped, the directory removed; a second run finds nothing to do."""
    image = tmp_path / "disk.raw"
    await qemu.create(image, "raw", 1 * MiB)
    server = qemu.QemuNbd(image, "raw")
    entry = {"dir": str(server.prepare()), "pid": None}
    await server.start()
    pid = server.pid
    assert pid is not None and qemu.processes_naming(entry["dir"]) == [pid]
    done = await stop_exports([entry])
    assert done == [
        f"stopped qemu-nbd {pid} left by the killed job in {entry['dir']}",
        f"removed export directory {entry['dir']}",
    ]
    assert qemu.processes_naming(entry["dir"]) == [] and not Path(entry["dir"]).exists()
    assert await stop_exports([entry]) == []  # idempotent: gone is success
    with pytest.raises(ValueError, match="not an NBD server"):
        await qemu.stop_leftovers(tmp_path)  # never deletes a directory it does not own
    await server.stop()  # reap the child


async def test_start_failure_quotes_stderr_and_cleans_up(tmp_path: Path) -> None:
    server = qemu.QemuNbd(tmp_path / "missing.qcow2", "qcow2", base_dir=tmp_path)
    with pytest.raises(qemu.QemuError) as info:
        await server.start()
    message = str(info.value)
    assert message.startswith("qemu-nbd --format=qcow2")
    assert "before serving" in message
    assert "missing.qcow2" in message
    assert server.pid is None
    assert list(tmp_path.iterdir()) == []  # its private directory is gone


async def test_qemu_img_failure_names_command_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(qemu.QemuError) as info:
        await qemu.info(tmp_path / "nothing.qcow2")
    message = str(info.value)
    assert message.startswith("qemu-img info --output=json")
    assert "exit status 1" in message
    assert "nothing.qcow2" in message
    with pytest.raises(ValueError, match="a size is needed"):
        await qemu.create(tmp_path / "x.qcow2", "qcow2", None)


async def test_overlay_on_a_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    await qemu.create(base, "qcow2", 2 * MiB)
    await qemu_io("qcow2", base, "write -P 7 0 64k")
    await qemu.create(top, "qcow2", None, backing=base)  # format read from the base
    data = await qemu.info(top, fmt="qcow2")
    assert data["backing-filename-format"] == "qcow2"
    assert data["virtual-size"] == 2 * MiB
    async with qemu.QemuNbd(top, "qcow2", read_only=True) as server:
        async with await connect(server.address) as client:
            assert await client.read(0, 4) == b"\x07" * 4


async def test_missing_program_and_long_socket_paths(tmp_path: Path) -> None:
    class Missing(qemu.NbdServerProcess):
        def argv(self, socket: Path) -> list[str]:
            return ["/nonexistent/nbd-server", str(socket)]

    server = Missing(base_dir=tmp_path)
    with pytest.raises(qemu.QemuError, match="cannot start"):
        await server.start()
    assert server.pid is None
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(ValueError, match="too long"):
        await Missing(base_dir=deep).start()
    assert list(tmp_path.iterdir()) == [deep]
    assert list(deep.iterdir()) == []
