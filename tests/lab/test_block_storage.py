"""Block storage domains in the lab, as on a real engine (issue 13 item 3, API-NOTES § 8.1):
an iSCSI domain beside the file one; sparse raw refused there; a thin qcow2 disk is a volume
of fixed allocation (``initial_size`` × 1.1, else the lab's chunk) that an upload cannot
pass, through imageio or through the DataMover's device."""

import asyncio
import os
from functools import partial
from pathlib import Path

import pytest
from ovirtsdk4 import types

from engine.core.units import KiB, MiB
from engine.io import qemu
from plugins.lab.engine.devices import Devices
from plugins.lab.engine.volumes import BlockVolumeNbd, allocation
from plugins.ovirt.imageio import ImageioDisk, ImageioError
from tests.lab.test_fake_engine_backup import Lab, fault, finalize_transfer, lab, raw_copy
from tests.lab.test_fake_engine_restore import add_disk, disk_ok, upload

pytestmark = pytest.mark.integration

__all__ = ["lab"]

BLOCK = [types.StorageDomain(name="block1")]
DATA = b"\xa5" * MiB


def test_allocation_follows_vdsm() -> None:
    assert allocation(None, 1 * MiB) == 1 * MiB
    assert allocation(10 * MiB) == 11 * MiB  # 1.1 × initial_size
    assert allocation(10 * MiB + 1) == 12 * MiB  # rounded up to a MiB


async def test_the_block_domain_is_listed_beside_the_file_one(lab: Lab) -> None:
    sds = await lab.sdk(lambda c: c.system_service().storage_domains_service().list())
    kinds = {s.name: s.storage.type for s in sds}
    assert kinds == {"data1": types.StorageType.NFS, "block1": types.StorageType.ISCSI}


async def test_sparse_raw_is_refused_on_block_storage(lab: Lab) -> None:
    e = await lab.sdk(
        fault(partial(add_disk, format=types.DiskFormat.RAW, sparse=True, storage_domains=BLOCK))
    )
    assert e.code == 400
    assert "Disk configuration (RAW Sparse) is incompatible with the storage domain type" in str(e)
    # Preallocated raw and thin qcow2 are what a block domain takes.
    raw = await lab.sdk(
        partial(add_disk, format=types.DiskFormat.RAW, sparse=False, storage_domains=BLOCK)
    )
    assert raw.actual_size == 2 * MiB
    thin = await lab.sdk(partial(add_disk, alias="thin", storage_domains=BLOCK))
    assert thin.actual_size == lab.engine.faults.volume_chunk  # no initial_size: one chunk


async def _upload(lab: Lab, disk_id: str, size: int) -> None:
    transfer = await lab.sdk(partial(upload, disk_id=disk_id))
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as target:
        writer = await target.open_writer()
        try:
            for offset in range(0, size, MiB):
                await writer.write(offset, DATA)
            await writer.flush()
        finally:
            await writer.close()
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))


async def test_an_upload_past_the_allocation_fails(lab: Lab) -> None:
    disk = await lab.sdk(partial(add_disk, provisioned_size=8 * MiB, storage_domains=BLOCK))
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    image = lab.engine.activity.images[disk.id]
    with pytest.raises(ImageioError, match="HTTP 500"):
        await _upload(lab, disk.id, 4 * MiB)  # 4 MiB of data into a 1 MiB volume
    assert lab.daemon is not None
    assert "No space left on device" in lab.daemon.log_path.read_text()
    assert image.stat().st_size == MiB  # the volume did not grow


async def test_initial_size_makes_the_upload_fit(lab: Lab) -> None:
    size = 4 * MiB
    measure = await qemu.qemu_img("measure", "-O", "qcow2", "--size", str(size))
    overhead = int(next(x for x in measure.split("\n") if "required" in x).split()[-1])
    disk = await lab.sdk(
        partial(
            add_disk,
            provisioned_size=8 * MiB,
            initial_size=overhead + size,
            storage_domains=BLOCK,
        )
    )
    assert disk.actual_size == allocation(overhead + size)
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    await _upload(lab, disk.id, size)
    copy = await raw_copy(lab.engine.activity.images[disk.id], lab.tmp)
    assert copy[:size] == DATA * (size // MiB) and not any(copy[size:])


async def test_initial_size_is_ignored_on_file_storage(lab: Lab) -> None:
    disk = await lab.sdk(partial(add_disk, provisioned_size=8 * MiB, initial_size=64 * KiB))
    assert disk.actual_size == 0
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    await _upload(lab, disk.id, 4 * MiB)  # file storage grows


async def test_a_datamover_write_past_the_allocation_fails(tmp_path: Path) -> None:
    image = tmp_path / "v.qcow2"
    await qemu.create(image, "qcow2", 8 * MiB)
    size = 2 * MiB
    image.write_bytes(image.read_bytes().ljust(size, b"\0"))
    devices = Devices(tmp_path / "by-id", tmp_path / "mnt")
    try:
        link = await devices.plug(
            "d" * 36, "virtio_scsi", image, "qcow2", transient=False, volume_size=size
        )
        assert isinstance(devices.plugged["d" * 36].nbd, BlockVolumeNbd)

        def write() -> None:
            with open(link, "r+b") as f:
                for offset in range(0, 6 * MiB, MiB):
                    f.seek(offset)
                    f.write(DATA)
                    f.flush()
                    os.fsync(f.fileno())

        with pytest.raises(OSError, match="No space left on device"):
            await asyncio.to_thread(write)
    finally:
        await devices.close()
    assert image.stat().st_size == size  # the volume never grew


async def test_seed_refuses_sparse_raw_on_block() -> None:
    from engine.core.errors import ConfigError
    from plugins.lab.engine import FakeEngine, Seed, VmSeed
    from plugins.lab.engine.state import DiskSeed

    seed = Seed(
        vms=(
            VmSeed(
                "a",
                disks=(
                    DiskSeed("a_os", MiB, format="raw", storage_domain="block1", backup="none"),
                ),
            ),
        )
    )
    with pytest.raises(ConfigError, match="sparse raw"):
        FakeEngine(seed, Path("/nonexistent"))
