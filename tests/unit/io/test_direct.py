"""Direct reads of real raw files (``engine.io.direct``): holes of a sparse file are zero
extents, reads fill the caller's view in place at any offset (also with several readers at
once), and a read past the end, a truncated file or something that is not a raw image fail
naming the disk and the offset. Faults of real devices (EIO, a loop device, a stuck read)
are in ``tests/integration/test_direct_reads.py``."""

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest

from engine.core.errors import TransientError
from engine.core.extent import Extent
from engine.core.units import KiB, MiB
from engine.io.direct import DirectImage, DirectImageError, DirectReadError
from tests.unit.io.leaks import threads_blocked_in, until

DISK = "disk-under-test"
SIZE = 8 * MiB
# (offset, length) of the data written into a sparse file; the rest is never written. Aligned
# to 4 KiB, the file system's block: holes are reported at that granularity.
PIECES = (
    (1 * MiB, 8 * KiB),
    (3 * MiB + 4 * KiB, 4 * KiB),
    (5 * MiB, 1 * MiB),
    (SIZE - 4 * KiB, 4 * KiB),
)


def sparse_file(path: Path) -> bytes:
    """A SIZE file made with truncate and writes: PIECES hold random bytes, the rest is holes.
    Returns its content."""
    rng = random.Random(5)
    content = bytearray(SIZE)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for offset, length in PIECES:
            piece = rng.randbytes(length)
            content[offset : offset + length] = piece
            f.seek(offset)
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    st = path.stat()
    assert st.st_blocks * 512 < SIZE // 2, "the file system did not keep the file sparse"
    return bytes(content)


def expected_extents(start: int, end: int) -> list[Extent]:
    """PIECES as data, the gaps as zero holes, cut to [start, end)."""
    out, pos = [], 0
    for offset, length in (*PIECES, (SIZE, 0)):
        for first, last, hole in ((pos, offset, True), (offset, offset + length, False)):
            s, e = max(first, start), min(last, end)
            if s < e:
                out.append(Extent(s, e - s, zero=hole, hole=hole))
        pos = offset + length
    return out


async def test_holes_of_a_sparse_file_are_zero_extents(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    content = sparse_file(path)
    image = await DirectImage.open(path, disk=DISK)
    try:
        assert (image.kind, image.size) == ("file", SIZE)
        windows = [
            (0, SIZE),
            (1 * MiB + 100, 50),  # inside data
            (2 * MiB, 4 * KiB),  # inside a hole
            (1 * MiB + 4 * KiB, 1 * MiB),  # data into a hole
            (3 * MiB, 5000),  # a hole into data, ending inside it
            (SIZE - 8 * KiB, 8 * KiB),  # a hole, then the data of the last block
        ]
        for offset, length in windows:
            extents = await image.extents(offset, length)
            assert extents == expected_extents(offset, offset + length), (offset, length)
        reader = await image.open_reader()
        try:
            for e in await image.extents(0, SIZE):  # zero extents read as zeros
                buf = bytearray(e.length)
                await reader.readinto(e.start, memoryview(buf))
                assert buf == content[e.start : e.end]
                if e.zero:
                    assert buf == bytes(e.length)
        finally:
            await reader.close()
    finally:
        await image.close()


async def test_reads_fill_the_callers_view_in_place(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    content = random.Random(1).randbytes(3 * MiB + 777)
    path.write_bytes(content)
    image = await DirectImage.open(path, disk=DISK)
    reader = await image.open_reader()
    try:
        assert image.size == len(content)
        arena = bytearray(b"\xaa" * (4 * MiB))
        for offset, length in [(0, 1), (1001, 3333), (1 * MiB - 7, 1 * MiB), (len(content) - 1, 1)]:
            with memoryview(arena)[100 : 100 + length] as view:
                await reader.readinto(offset, view)
            assert arena[100 : 100 + length] == content[offset : offset + length]
            assert arena[:100] == b"\xaa" * 100
            assert arena[100 + length :] == b"\xaa" * (len(arena) - 100 - length)
            arena[:] = b"\xaa" * len(arena)
    finally:
        await reader.close()
        await image.close()


async def test_concurrent_readers_each_get_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    content = random.Random(2).randbytes(4 * MiB)
    path.write_bytes(content)
    image = await DirectImage.open(path, disk=DISK)
    out = bytearray(len(content))
    slots = list(range(0, len(content), 64 * KiB))
    random.Random(3).shuffle(slots)

    async def read(share: list[int]) -> None:
        reader = await image.open_reader()
        try:
            for offset in share:
                await reader.readinto(offset, memoryview(out)[offset : offset + 64 * KiB])
        finally:
            await reader.close()

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(4):
                tg.create_task(read(slots[i::4]))
    finally:
        await image.close()
    assert out == content


async def test_a_read_past_the_end_names_the_disk_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 * MiB))
    image = await DirectImage.open(path, disk=DISK)
    reader = await image.open_reader()
    try:
        with pytest.raises(DirectReadError) as info:
            await reader.readinto(1 * MiB - 10, memoryview(bytearray(20)))
        assert not isinstance(info.value, TransientError)
        assert f"disk {DISK}" in str(info.value)
        assert f"at offset {1 * MiB - 10}" in str(info.value)
        assert "pass the end of the file (1048576 bytes)" in str(info.value)
        with pytest.raises(DirectReadError, match="pass the end"):
            await image.extents(0, 1 * MiB + 1)
    finally:
        await reader.close()
        await image.close()


async def test_a_truncated_file_fails_reads_and_extents_never_zeros(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(4).randbytes(4 * MiB))
    image = await DirectImage.open(path, disk=DISK)
    reader = await image.open_reader()
    try:
        os.truncate(path, 2 * MiB + 5)  # cut off behind the backup's back
        buf = bytearray(1 * MiB)
        await reader.readinto(1 * MiB, memoryview(buf))  # before the cut: still fine
        with pytest.raises(DirectReadError) as info:
            await reader.readinto(2 * MiB, memoryview(buf))
        error = info.value
        assert not isinstance(error, TransientError), "a truncated file stays truncated"
        assert f"disk {DISK}: reading {path} at offset {2 * MiB + 5}" in str(error)
        assert "truncated" in str(error)
        # The lost range is an error, never reported as zeros.
        with pytest.raises(DirectReadError, match=r"truncated to 2097157 bytes"):
            await image.extents(0, 4 * MiB)
    finally:
        await reader.close()
        await image.close()


async def test_what_is_not_a_raw_image_is_refused(tmp_path: Path) -> None:
    for path, why in (
        (tmp_path, "not a regular file or block device"),
        (Path("/dev/null"), "not a regular file or block device"),
        (tmp_path / "missing.raw", "ENOENT"),
    ):
        with pytest.raises(DirectImageError) as info:
            await DirectImage.open(path, disk=DISK)
        assert str(info.value).startswith(f"disk {DISK}: {path}: ")
        assert why in str(info.value)


async def test_close_is_idempotent_and_closed_objects_refuse(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(64 * KiB))
    before = {t.ident for t in threading.enumerate()}
    image = await DirectImage.open(path, disk=DISK)
    readers = [await image.open_reader() for _ in range(3)]
    for reader in readers:
        await reader.readinto(0, memoryview(bytearray(4096)))
        await reader.close()
        await reader.close()
        with pytest.raises(DirectImageError, match="closed"):
            await reader.readinto(0, memoryview(bytearray(1)))
    await image.close()
    await image.close()
    with pytest.raises(DirectImageError, match="closed"):
        await image.extents(0, 1)
    with pytest.raises(DirectImageError, match="closed"):
        await image.open_reader()
    # Each reader's thread ends once the reader is closed.
    for thread in threading.enumerate():
        if thread.ident not in before and thread.name.startswith("tessera-read"):
            thread.join(10)
            assert not thread.is_alive(), f"{thread.name} still runs after its reader closed"


async def test_a_cancelled_open_leaks_no_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(4096))
    image = await DirectImage.open(path, disk=DISK)
    try:
        # The path becomes a FIFO: opening it blocks in the thread until a writer comes.
        path.unlink()
        os.mkfifo(path)
        task = asyncio.create_task(image.open_reader())
        await until(lambda: threads_blocked_in(wchan="wait_for_partner"), "the FIFO open")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer = os.open(path, os.O_WRONLY)  # the thread's open returns now
        try:
            await until(lambda: fds_on(path) == [writer], "the late descriptor closed")
        finally:
            os.close(writer)
    finally:
        await image.close()


def fds_on(path: Path) -> list[int]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(fd) == str(path):
                found.append(int(fd.name))
        except OSError:
            continue
    return found
