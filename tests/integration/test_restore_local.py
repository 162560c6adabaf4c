"""Restore snapshots into new and existing local images through real qemu-img and qemu-nbd.

Byte identity is checked by reading raw files and, for qcow2, by ``qemu-img compare`` against
a raw copy of the source bytes and by ``qemu-img convert -O raw``. Failures (a corrupt pack,
cancellation) must leave no image and no qemu-nbd behind; an existing path is never
overwritten; an existing image gets zeros where the snapshot has zero slots.
"""

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.errors import ChunkMissing, ConfigError, CorruptRecord
from engine.core.ids import short
from engine.io import qemu
from engine.jobs.journal import Journal
from engine.jobs.restore import run_restore
from engine.jobs.states import State
from engine.restore.disk import RestoreStats, restore_disk
from engine.sources.types import DiskWriter, ResourceRecorder, TargetDisk
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.workers import make_cpu_pool
from engine.workers.pool import CpuPool
from plugins.local import LocalImages
from plugins.local.target import PARTIAL_SUFFIX, LocalImageTarget
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes, write_snapshot

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
SECTOR = 512  # qemu sizes images in sectors


def source_disks() -> dict[str, bytes]:
    """Sizes are sector multiples but not chunk multiples; zero runs; repeated chunks."""
    block = realistic_bytes(CHUNK, seed=11)
    mixed = (
        realistic_bytes(5 * CHUNK + 4096, seed=1)
        + bytes(3 * CHUNK + 512)
        + block * 4
        + realistic_bytes(CHUNK // 2, seed=2)
        + bytes(3 * CHUNK)
        + block
        + realistic_bytes(3 * 1024, seed=3)
    )
    return {
        "mixed": mixed,
        "small": block + realistic_bytes(4608, seed=4),  # shares a chunk with "mixed"
        "zeros": bytes(2 * CHUNK + 512),
    }


def distinct_chunks(data: bytes) -> int:
    chunks = {data[i : i + CHUNK] for i in range(0, len(data), CHUNK)}
    return sum(1 for c in chunks if any(c))


def zero_slot_bytes(data: bytes) -> int:
    slots = (data[i : i + CHUNK] for i in range(0, len(data), CHUNK))
    return sum(len(s) for s in slots if not any(s))


@pytest.fixture
async def pools() -> AsyncIterator[list[CpuPool]]:
    """Pools made by a test; closed at teardown."""
    made: list[CpuPool] = []
    yield made
    for pool in made:
        await pool.aclose()


def new_pool(store: Store, pools: list[CpuPool], kind: str = "thread") -> CpuPool:
    pool = make_cpu_pool(store.keys, CHUNK, kind=kind, workers=2, capacity=6)
    pools.append(pool)
    return pool


async def restore_to(
    store: Store,
    pool: CpuPool,
    manifest: Manifest,
    index: int,
    path: Path,
    *,
    existing: bool = False,
) -> RestoreStats:
    disk = manifest.disks[index]
    async with LocalImageTarget(path, disk.size, name=disk.name, existing=existing) as target:
        assert target.fresh == (not existing)
        return await restore_disk(store, pool, manifest, disk, target, writers=3)


async def raw_bytes_of(image: Path, fmt: str, scratch: Path) -> bytes:
    """The guest-visible bytes of an image: the file itself for raw, qemu-img convert else."""
    if fmt == "raw":
        return image.read_bytes()
    out = scratch / f"{image.name}.converted.raw"
    await qemu.qemu_img("convert", "-f", fmt, "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_nbd_serving(tmp_path: Path) -> list[int]:
    """Pids of qemu-nbd processes serving an image under ``tmp_path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-nbd") and any(str(tmp_path).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
async def test_restore_into_new_images_is_byte_identical(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path, fmt: str, encryption: str
) -> None:
    store = make_store(encryption=encryption, chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    pool = new_pool(store, pools)
    for index, (name, data) in enumerate(disks.items()):
        image = tmp_path / f"{name}.{fmt}"
        stats = await restore_to(store, pool, manifest, index, image)
        assert image.exists() and not Path(f"{image}{PARTIAL_SUFFIX}").exists()
        assert stats.chunks_read == stats.chunks_decoded == distinct_chunks(data)
        assert stats.bytes_restored == len(data)
        assert stats.zero_bytes_written == 0, "a fresh image needs no zero writes"
        assert stats.zero_bytes_skipped == zero_slot_bytes(data)
        assert await raw_bytes_of(image, fmt, tmp_path) == data
        if fmt == "qcow2":
            source = tmp_path / f"{name}.source.raw"
            source.write_bytes(data)
            await qemu.qemu_img("compare", "-f", "raw", "-F", "qcow2", source, image)
    assert not qemu_nbd_serving(tmp_path)


async def test_qcow2_restore_leaves_zero_slots_unallocated(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    data = realistic_bytes(2 * CHUNK, seed=7) + bytes(8 * CHUNK) + realistic_bytes(CHUNK, seed=8)
    manifest = write_snapshot(store, "vm", {"d": data})
    image = tmp_path / "d.qcow2"
    await restore_to(store, new_pool(store, pools), manifest, 0, image)
    mapping = json.loads(await qemu.qemu_img("map", "--output=json", "-f", "qcow2", image))
    allocated = sum(m["length"] for m in mapping if m["data"])
    assert allocated == 3 * CHUNK


async def test_process_pool_restore(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    pool = new_pool(store, pools, kind="process")
    image = tmp_path / "mixed.qcow2"
    await restore_to(store, pool, manifest, 0, image)
    assert await raw_bytes_of(image, "qcow2", tmp_path) == disks["mixed"]


async def test_size_that_is_not_a_sector_multiple_gets_a_zero_tail(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    data = realistic_bytes(CHUNK + 1001, seed=9)
    manifest = write_snapshot(store, "vm", {"odd": data})
    image = tmp_path / "odd.img"
    await restore_to(store, new_pool(store, pools), manifest, 0, image)
    restored = image.read_bytes()
    assert len(restored) == -(-len(data) // SECTOR) * SECTOR
    assert restored[: len(data)] == data
    assert not any(restored[len(data) :])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
async def test_corrupt_pack_fails_and_removes_the_partial_image(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path, fmt: str
) -> None:
    store = make_store(chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    data = disks["mixed"]
    victim = store.codec.chunk_id(data[2 * CHUNK : 3 * CHUNK])
    loc = store.index.lookup(victim)
    assert loc is not None
    pack = store.layout.packs / loc.pack[:2] / f"{loc.pack}.pack"
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length - 20)  # inside the payload, before the CRC
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    image = tmp_path / f"mixed.{fmt}"
    with pytest.raises(CorruptRecord) as info:
        await restore_to(store, new_pool(store, pools), manifest, 0, image)
    assert info.value.fields["chunk"] == short(victim)
    assert info.value.fields["pack"] == loc.pack
    assert info.value.fields["offset"] == loc.offset
    assert short(victim) in str(info.value) and loc.pack in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mixed")) == []
    assert not qemu_nbd_serving(tmp_path)


async def test_cancelled_restore_removes_the_partial_image(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    pool = new_pool(store, pools)
    image = tmp_path / "mixed.qcow2"
    disk = manifest.disks[0]

    async def run() -> None:
        async with LocalImageTarget(image, disk.size) as target:
            me = asyncio.current_task()
            assert me is not None
            # Cancel from inside, at the first progress report: no timing involved.
            await restore_disk(store, pool, manifest, disk, target, progress=lambda _: me.cancel())

    task = asyncio.create_task(run())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not image.exists()
    assert not Path(f"{image}{PARTIAL_SUFFIX}").exists()
    assert not qemu_nbd_serving(tmp_path)


async def test_existing_path_is_never_overwritten(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    manifest = write_snapshot(store, "vm", {"d": realistic_bytes(2 * CHUNK, seed=10)})
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"precious")
    with pytest.raises(ConfigError, match=f"{image} already exists"):
        await restore_to(store, new_pool(store, pools), manifest, 0, image)
    assert image.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d.")) == ["d.qcow2"]
    # A partial image in the way (a concurrent or interrupted restore) is refused too.
    other = tmp_path / "e.raw"
    Path(f"{other}{PARTIAL_SUFFIX}").write_bytes(b"")
    with pytest.raises(ConfigError, match="another restore"):
        await restore_to(store, new_pool(store, pools), manifest, 0, other)
    assert not other.exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
async def test_restore_into_existing_image_writes_zeros(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path, fmt: str
) -> None:
    store = make_store(chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    data = disks["mixed"]
    filled = tmp_path / "filled.raw"
    filled.write_bytes(b"\xab" * (len(data) + CHUNK))  # larger than the disk: allowed
    image = tmp_path / f"existing.{fmt}"
    if fmt == "raw":
        filled.rename(image)
    else:
        await qemu.qemu_img("convert", "-f", "raw", "-O", "qcow2", filled, image)
    stats = await restore_to(store, new_pool(store, pools), manifest, 0, image, existing=True)
    assert stats.zero_bytes_written == zero_slot_bytes(data) > 0
    assert stats.zero_bytes_skipped == 0
    restored = await raw_bytes_of(image, fmt, tmp_path)
    assert restored[: len(data)] == data
    assert restored[len(data) :] == b"\xab" * CHUNK, "beyond the disk: untouched"


async def test_existing_image_must_exist_and_be_large_enough(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    manifest = write_snapshot(store, "vm", {"d": realistic_bytes(2 * CHUNK, seed=12)})
    pool = new_pool(store, pools)
    with pytest.raises(ConfigError, match="does not exist"):
        await restore_to(store, pool, manifest, 0, tmp_path / "nope.raw", existing=True)
    small = tmp_path / "small.qcow2"
    await qemu.create(small, "qcow2", CHUNK)
    with pytest.raises(ConfigError, match="the disk needs 131072"):
        await restore_to(store, pool, manifest, 0, small, existing=True)
    assert small.exists(), "an existing image is never deleted"
    assert not qemu_nbd_serving(tmp_path)


async def test_existing_image_of_another_format_than_its_suffix_is_refused(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    manifest = write_snapshot(store, "vm", {"d": realistic_bytes(2 * CHUNK, seed=13)})
    image = tmp_path / "really-qcow2.img"
    await qemu.create(image, "qcow2", 2 * CHUNK)
    before = image.read_bytes()
    with pytest.raises(ConfigError, match="suffix says raw but qemu-img finds qcow2"):
        await restore_to(store, new_pool(store, pools), manifest, 0, image, existing=True)
    assert image.read_bytes() == before


async def test_failed_restore_into_existing_image_keeps_it(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    store = make_store(chunk_size=CHUNK)
    data = realistic_bytes(3 * CHUNK, seed=14)
    manifest = write_snapshot(store, "vm", {"d": data})
    loc = store.index.lookup(store.codec.chunk_id(data[CHUNK : 2 * CHUNK]))
    assert loc is not None
    store.index.drop_pack(loc.pack)  # every chunk of this small snapshot is now missing
    image = tmp_path / "existing.raw"
    image.write_bytes(bytes(len(data)))
    with pytest.raises(ChunkMissing):
        await restore_to(store, new_pool(store, pools), manifest, 0, image, existing=True)
    assert image.stat().st_size == len(data)
    assert not qemu_nbd_serving(tmp_path)


async def test_writers_beyond_the_export_limit_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    async with LocalImageTarget(image, CHUNK, max_connections=2) as target:
        first, second = await target.open_writer(), await target.open_writer()
        with pytest.raises(ConfigError, match="at most 2"):
            await target.open_writer()
        await first.close()
        third = await target.open_writer()  # a closed writer frees its place
        await third.write(0, b"x" * 512)
        await second.write(512, b"y" * 512)
        await third.flush()
        await second.flush()
        # ``second`` and ``third`` are left open: leaving the target closes them
    assert image.read_bytes()[:1024] == b"x" * 512 + b"y" * 512
    assert not qemu_nbd_serving(tmp_path)


BUFFERS = 16


class _Meeting:
    """A real target whose writers hold each disk's writes until two disks write at once."""

    def __init__(self, disk: TargetDisk, writing: set[str], both: asyncio.Event) -> None:
        self.info, self.fresh = disk.info, disk.fresh
        self._disk, self._writing, self._both = disk, writing, both

    async def open_writer(self) -> DiskWriter:
        return _MeetingWriter(await self._disk.open_writer(), self)

    async def meet(self) -> None:
        self._writing.add(self.info.disk_id)
        if len(self._writing) >= 2:
            self._both.set()
        await self._both.wait()


class _MeetingWriter:
    def __init__(self, writer: DiskWriter, disk: _Meeting) -> None:
        self._writer, self._disk = writer, disk

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._disk.meet()
        await self._writer.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._disk.meet()
        await self._writer.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self._writer.flush()

    async def close(self) -> None:
        await self._writer.close()


async def test_disks_are_written_into_their_images_at_once(
    make_store: StoreFactory, pools: list[CpuPool], tmp_path: Path
) -> None:
    """Two disks' images are written at the same time through their own qemu-nbd: each
    disk's first write waits until the other disk writes too, which a restore of one disk
    after the other never gets past. Every image is complete; no partial image is left."""
    store = make_store(chunk_size=CHUNK)
    disks = source_disks()
    manifest = write_snapshot(store, "vm", disks)
    writing: set[str] = set()
    both = asyncio.Event()
    images = LocalImages()

    @contextlib.asynccontextmanager
    async def meeting(entry: DiskEntry, record: ResourceRecorder) -> AsyncIterator[TargetDisk]:
        path = tmp_path / f"{entry.name}.qcow2"
        async with images.image_target(path, entry, record) as disk:
            yield _Meeting(disk, writing, both)

    # More buffers than a disk has chunks: a disk held at its first write keeps the buffers
    # its chunks took (a disk has no share of the pool of its own), and the other needs one.
    assert distinct_chunks(disks["mixed"]) < BUFFERS
    pool = make_cpu_pool(store.keys, CHUNK, kind="thread", workers=2, capacity=BUFFERS)
    pools.append(pool)
    async with asyncio.timeout(60):  # only reached when the disks never write at once
        outcome = await run_restore(
            store=store,
            pool=pool,
            snapshot_id=manifest.snapshot_id,
            disks=None,
            plugin="local",
            make_target=meeting,
            journal=Journal(store.path / "journal"),
            disks_at_once=2,
        )
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert writing == {"mixed", "small"}  # "zeros" writes nothing into a fresh image
    for name, data in disks.items():
        assert await raw_bytes_of(tmp_path / f"{name}.qcow2", "qcow2", tmp_path) == data
    assert not list(tmp_path.glob(f"*{PARTIAL_SUFFIX}"))
    assert not qemu_nbd_serving(tmp_path)
