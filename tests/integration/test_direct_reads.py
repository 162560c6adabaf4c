"""Direct reads (``engine.io.direct``) of real failing and real block devices.

A *FUSE file* is nbdkit (``file`` plugin over a raw image, with its ``error`` or ``delay``
filter) shown as a regular file by ``nbdfuse``, as the lab shows DataMover devices: its
reads fail with a real EIO while a toggle file exists. A *loop device* over such a file is a
real block device whose reads fail the same way. Checked: EIO is a retryable error naming
the disk, the path and the offset, from a file and from a block device; a block device is
sized by the kernel and reports everything as data; ``drop_cache`` really drops what was
read (``fincore``); a cancelled read returns only once its thread has filled the buffer;
a backup job of a raw image retries transient EIO to an exact snapshot and fails a
persistent one naming the disk and offset, nothing half-committed; a loop device given as
an image is read directly, its zero slots found by reading.
"""

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from engine.core.errors import TransientError
from engine.core.extent import Extent
from engine.core.units import KiB, MiB
from engine.io.direct import DirectImage, DirectTransientReadError
from engine.jobs.states import State
from engine.maint.check import check_store
from engine.sources.types import BackupSession, ResourceRecorder
from plugins.lab.engine.devices import mount_fuse, mounts_under, unmount_fuse
from plugins.local.source import LocalImageSource
from tests.conftest import StoreFactory
from tests.helpers import backup_with_retries, read_disk
from tests.integration.test_nbd_nbdkit import NbdKit
from tests.unit.io import leaks
from tests.unit.io.leaks import PREADV, threads_blocked_in, until

pytestmark = pytest.mark.integration

DISK = "disk-under-test"


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every server a test started is reaped by its end (zombies count)."""
    processes = leaks.children()
    yield
    assert leaks.children() <= processes


def raw_image(path: Path, size: int = 4 * MiB) -> bytes:
    """A sparse raw image with random data in its first and third MiB; returns its bytes."""
    rng = random.Random(11)
    content = bytearray(size)
    for offset in (0, 2 * MiB):
        content[offset : offset + 1 * MiB] = rng.randbytes(1 * MiB)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in (0, 2 * MiB):
            f.seek(offset)
            f.write(content[offset : offset + 1 * MiB])
    return bytes(content)


@contextlib.asynccontextmanager
async def fuse_file(directory: Path, *nbdkit_args: str) -> AsyncIterator[Path]:
    """nbdkit with ``nbdkit_args`` served as a regular file by nbdfuse, as the lab shows an
    attached disk (``plugins.lab.engine.devices``); unmounted after."""
    mountpoint = directory / "mnt"
    mountpoint.mkdir()
    async with NbdKit(*nbdkit_args) as server:
        fuse = await mount_fuse(mountpoint, server.address, DISK)
        try:
            yield mountpoint / "nbd"
        finally:
            await unmount_fuse(mountpoint, fuse)
    assert not mounts_under(directory)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """A read-only loop device over ``backing``; detached after."""
    made = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, f"cannot make a loop device: {made.stderr.strip()}"
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)


def error_filter(image: Path, toggle: Path, rate: str = "100%") -> list[str]:
    """nbdkit arguments: ``image`` whose reads fail with EIO at ``rate`` while ``toggle``
    exists."""
    return [
        "--filter=error",
        "file",
        str(image),
        "error-pread=EIO",
        f"error-pread-rate={rate}",
        f"error-pread-file={toggle}",
    ]


async def read(image: DirectImage, offset: int, length: int) -> bytes:
    reader = await image.open_reader()
    try:
        buf = bytearray(length)
        await reader.readinto(offset, memoryview(buf))
        return bytes(buf)
    finally:
        await reader.close()


async def test_eio_from_a_file_is_retryable_and_names_disk_and_offset(tmp_path: Path) -> None:
    content = raw_image(tmp_path / "image.raw")
    toggle = tmp_path / "fail"
    async with fuse_file(tmp_path, *error_filter(tmp_path / "image.raw", toggle)) as path:
        image = await DirectImage.open(path, disk=DISK)
        try:
            assert (image.kind, image.size) == ("file", len(content))
            toggle.touch()
            with pytest.raises(DirectTransientReadError) as info:
                await read(image, 1 * MiB + 4096, 64 * KiB)
            error = info.value
            assert isinstance(error, TransientError) and error.retryable
            assert str(error) == (
                f"disk {DISK}: reading {path} at offset {1 * MiB + 4096}: EIO (Input/output error)"
            )
            toggle.unlink()  # the fault goes away: a new reader (the retry) gets the bytes
            assert (
                await read(image, 1 * MiB + 4096, 64 * KiB)
                == content[1 * MiB + 4096 : 1 * MiB + 4096 + 64 * KiB]
            )
        finally:
            await image.close()


async def test_a_block_device_is_all_data_and_fails_with_eio(tmp_path: Path) -> None:
    content = raw_image(tmp_path / "image.raw")  # sparse: holes in its second and last MiB
    toggle = tmp_path / "fail"
    async with fuse_file(tmp_path, *error_filter(tmp_path / "image.raw", toggle)) as path:
        with loop_device(path) as device:
            image = await DirectImage.open(device, disk=DISK)
            try:
                assert (image.kind, image.size) == ("block device", len(content))
                # A block device cannot tell holes: everything is data, zeros found by reading.
                assert await image.extents(0, image.size) == [Extent(0, image.size)]
                assert await image.extents(5000, 7) == [Extent(5000, 7)]

                toggle.touch()  # nothing was read yet: no page cache hides the fault
                with pytest.raises(DirectTransientReadError) as info:
                    await read(image, 2 * MiB, 64 * KiB)
                assert str(info.value).startswith(
                    f"disk {DISK}: reading {device} at offset {2 * MiB}: EIO"
                )
                toggle.unlink()
                assert await read(image, 0, image.size) == content
            finally:
                await image.close()


@pytest.mark.parametrize("drop", [False, True])
async def test_drop_cache_drops_what_was_read(tmp_path: Path, drop: bool) -> None:
    assert shutil.which("fincore"), "fincore (Debian package util-linux) is not installed"
    path = tmp_path / "image.raw"
    content = raw_image(path)
    image = await DirectImage.open(path, disk=DISK, drop_cache=drop)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # written back: only then can the cache drop the pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert cached(path) == 0
        assert await read(image, 0, image.size) == content
        assert cached(path) == (0 if drop else image.size)
    finally:
        await image.close()


def cached(path: Path) -> int:
    """Bytes of ``path`` in the page cache."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out)


async def test_a_cancelled_read_returns_once_its_thread_filled_the_buffer(
    tmp_path: Path,
) -> None:
    content = raw_image(tmp_path / "image.raw")
    slow = ["--filter=delay", "file", str(tmp_path / "image.raw"), "delay-read=1"]
    async with fuse_file(tmp_path, *slow) as path:
        image = await DirectImage.open(path, disk=DISK)
        reader = await image.open_reader()
        try:
            buf = bytearray(4096)
            task = asyncio.create_task(reader.readinto(0, memoryview(buf)))
            # The reader's thread waits in preadv for nbdkit's 1 s delay.
            await until(lambda: threads_blocked_in(PREADV), "a thread in preadv")
            assert buf == bytes(4096)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Cancelled, yet it returned only after the thread let go: the buffer is full, and
            # nothing writes into it any more (the caller may give it to someone else).
            assert buf == content[:4096]
        finally:
            await reader.close()
            await image.close()


class TogglingSource(LocalImageSource):
    """The local source whose reads start failing once it is open (``qemu-img info``,
    which probes the image's format in ``open``, still reads it)."""

    def __init__(self, paths: Sequence[Path], toggle: Path) -> None:
        super().__init__(paths)
        self.toggle = toggle

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> BackupSession:
        session = await super().open(
            parent_checkpoint, keep_checkpoints, new_checkpoint, readers, record
        )
        self.toggle.touch()
        return session


async def test_backup_of_a_raw_image_retries_transient_eio(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=256 * KiB, pack_size=8 * MiB)
    content = raw_image(tmp_path / "image.raw", 8 * MiB)
    toggle = tmp_path / "fail"
    nbdkit = error_filter(tmp_path / "image.raw", toggle, rate="30%")
    async with fuse_file(tmp_path, *nbdkit) as path:
        # 30 % of FUSE's requests fail (a slot takes one or two); 20 attempts make a false
        # failure ~1e-7 per slot, and a run without any fault ~1e-5.
        outcome = await backup_with_retries(store, TogglingSource([path], toggle), attempts=20)
        assert outcome.record.state is State.SUCCEEDED, outcome.record.error
        assert sum(d.retries for d in outcome.disks) > 0
        assert outcome.manifest is not None
        assert read_disk(store, outcome.manifest) == content
        assert "exports" not in outcome.record.resources  # read directly: no server


async def test_backup_of_a_raw_image_fails_on_persistent_eio_naming_disk_and_offset(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=256 * KiB, pack_size=8 * MiB)
    raw_image(tmp_path / "image.raw", 8 * MiB)
    toggle = tmp_path / "fail"
    async with fuse_file(tmp_path, *error_filter(tmp_path / "image.raw", toggle)) as path:
        outcome = await backup_with_retries(store, TogglingSource([path], toggle), attempts=3)
        record = outcome.record
        assert record.state is State.FAILED
        assert record.error is not None
        assert f"disk {path} at offset " in record.error, record.error
        assert f"reading {path} at offset " in record.error and "EIO" in record.error
        assert outcome.manifest is None
        assert store.snapshots() == []
        assert check_store(store, data=True).ok


async def test_backup_of_a_loop_device_reads_it_directly(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=256 * KiB, pack_size=8 * MiB)
    content = raw_image(tmp_path / "image.raw", 8 * MiB)
    with loop_device(tmp_path / "image.raw") as device:
        outcome = await backup_with_retries(store, LocalImageSource([device]), attempts=1)
        assert outcome.record.state is State.SUCCEEDED, outcome.record.error
        assert outcome.manifest is not None
        (disk,) = outcome.manifest.disks
        assert (disk.size, disk.attributes["format"]) == (len(content), "raw")
        assert read_disk(store, outcome.manifest) == content
        # All data to the source: its zero slots were found by reading them.
        stats = outcome.disks[0]
        assert (stats.bytes_read, stats.zero_slots, stats.read_slots) == (len(content), 24, 8)
