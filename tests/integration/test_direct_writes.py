"""Direct writes (``engine.io.direct_write``) into real files and block devices, and their
faults: a restore target over a raw image with no qemu-nbd.

Checked: written bytes land in place and zeroes become holes (a file) or are zeroed by the
device (a loop device: ``BLKZEROOUT``); a full file system (a 2 MiB tmpfs) fails the write
with ENOSPC naming the disk, the path and the offset, and a restore into it fails the same
way and leaves no partial image; a file whose writes fail with a real EIO (nbdkit's error
filter shown as a file by nbdfuse, as the lab shows devices) fails naming the same; a write
past the disk's end writes nothing.
"""

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.units import KiB, MiB
from engine.io.direct_write import DirectWritable, DirectWriteError
from engine.restore.disk import restore_disk
from engine.store.chunk_store import Store
from engine.workers import make_cpu_pool
from plugins.local.target import DirectTargetDisk, LocalImageTarget
from tests.conftest import StoreFactory
from tests.helpers import write_snapshot
from tests.integration.test_direct_reads import fuse_file

pytestmark = pytest.mark.integration

DISK = "disk-under-test"


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tessera-test", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    made = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, f"cannot make a loop device: {made.stderr.strip()}"
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


async def write_through(image: DirectWritable, pieces: list[tuple[int, bytes | int]]) -> None:
    """Write (offset, bytes) and zero (offset, length) pieces, then flush, on one writer."""
    writer = await image.open_writer()
    try:
        for offset, what in pieces:
            if isinstance(what, int):
                await writer.write_zeroes(offset, what)
            else:
                await writer.write(offset, what)
        await writer.flush()
    finally:
        await writer.close()


async def test_bytes_land_in_place_and_zeroes_become_holes_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 * MiB))  # allocated everywhere
    data = os.urandom(256 * KiB)
    image = await DirectWritable.open(path, disk=DISK, size=4 * MiB)
    try:
        assert image.kind == "file"
        await write_through(image, [(1 * MiB, data), (2 * MiB, 1 * MiB)])
    finally:
        await image.close()
    content = path.read_bytes()
    assert content[1 * MiB : 1 * MiB + len(data)] == data
    assert content[2 * MiB : 3 * MiB] == bytes(1 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:  # the zeroed MiB is a hole now, not written zeros
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 2 * MiB
        assert os.lseek(fd, 2 * MiB, os.SEEK_DATA) == 3 * MiB
    finally:
        os.close(fd)


async def test_a_block_device_takes_bytes_and_zeroes(tmp_path: Path) -> None:
    backing = tmp_path / "backing.raw"
    backing.write_bytes(os.urandom(4 * MiB))
    data = os.urandom(64 * KiB)
    with loop_device(backing) as device:
        image = await DirectWritable.open(device, disk=DISK, size=4 * MiB)
        try:
            assert image.kind == "block device"
            await write_through(image, [(0, data), (1 * MiB, 2 * MiB)])
        finally:
            await image.close()
    content = backing.read_bytes()
    assert content[: len(data)] == data
    assert content[1 * MiB : 3 * MiB] == bytes(2 * MiB)


async def test_a_full_file_system_fails_the_write_naming_disk_path_and_offset(
    tmp_path: Path,
) -> None:
    with tiny_tmpfs(tmp_path / "small") as small:
        path = small / "disk.raw"
        with path.open("wb") as f:
            f.truncate(8 * MiB)  # sparse: the file system has room for 2 MiB of it
        image = await DirectWritable.open(path, disk=DISK, size=8 * MiB)
        try:
            with pytest.raises(DirectWriteError) as info:
                await write_through(image, [(0, os.urandom(4 * MiB))])
        finally:
            await image.close()
    text = str(info.value)
    assert text.startswith(f"disk {DISK}: writing {path} at offset "), text
    assert "ENOSPC (No space left on device)" in text, text


async def test_eio_from_the_file_fails_the_write_naming_disk_and_offset(tmp_path: Path) -> None:
    backing = tmp_path / "image.raw"
    with backing.open("wb") as f:
        f.truncate(4 * MiB)
    toggle = tmp_path / "fail"
    toggle.touch()
    nbdkit = ["--filter=error", "file", str(backing), "error-pwrite=EIO"]
    nbdkit += ["error-pwrite-rate=100%", f"error-pwrite-file={toggle}"]
    async with fuse_file(tmp_path, *nbdkit) as path:
        image = await DirectWritable.open(path, disk=DISK, size=4 * MiB)
        try:
            with pytest.raises(DirectWriteError) as info:
                # the error comes with the write or, through a cache, with the flush
                await write_through(image, [(1 * MiB, os.urandom(64 * KiB))])
        finally:
            await image.close()
    text = str(info.value)
    assert text.startswith(f"disk {DISK}: writing {path} at offset "), text
    assert "EIO (Input/output error)" in text, text


async def test_a_write_past_the_end_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(1 * MiB)
    image = await DirectWritable.open(path, disk=DISK, size=1 * MiB)
    try:
        with pytest.raises(DirectWriteError) as info:
            await write_through(image, [(1 * MiB - 10, b"x" * 20)])
    finally:
        await image.close()
    assert "pass the end of the disk (1048576 bytes)" in str(info.value)
    assert path.read_bytes() == bytes(1 * MiB) and path.stat().st_size == 1 * MiB


async def test_a_restore_into_a_full_file_system_fails_and_leaves_no_image(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store: Store = make_store()
    disk = os.urandom(6 * MiB)  # incompressible: the 2 MiB tmpfs cannot hold it
    manifest = write_snapshot(store, "vm", {"disk0": disk})
    entry = manifest.disks[0]
    pool = make_cpu_pool(store.keys, manifest.chunk_size)
    try:
        with tiny_tmpfs(tmp_path / "small") as small:
            target = LocalImageTarget(small / "disk.raw", entry.size, name=entry.name)
            with pytest.raises(DirectWriteError) as info:
                async with target as opened:
                    assert isinstance(opened, DirectTargetDisk)  # no qemu-nbd for raw
                    await restore_disk(store, pool, manifest, entry, opened)
            assert "ENOSPC" in str(info.value) and f"disk {entry.name}:" in str(info.value)
            assert os.listdir(small) == []  # neither the image nor its partial file
    finally:
        await pool.aclose()
