"""Files out of a lab VM's backup: a VM whose disk is laid out as a guest's (MBR; ext4, XFS
and NTFS partitions; an ext4 volume of an LVM volume group: ``plugins.lab.guest_disk``) is
backed up through the lab's engine and the real ovirt-imageio with ``tessera backup vm``;
then every one of its files comes back byte-identical through ``files get`` and through
``mount`` (FUSE), both in one appliance. The disk is the lab's build for that seed
(``build_disks``, shared with the other appliance tests: ``tests.guest_disks``), made qcow2 by
the lab's ``finish_image`` as ``build_disks`` does.

The appliance runs emulated (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``): this machine's KVM is
nested and does not boot a Linux guest.
"""

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from engine.restore.files import GuestTree
from engine.store.chunk_store import Store
from engine.workers import make_cpu_pool
from plugins.lab.disks import finish_image
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.guest_disk import LINK, guest_files
from plugins.lab.imageio import ImageioDaemon
from tests.cli import Cli
from tests.guest_disks import NAME, SIZE, guest_disk_copy

pytestmark = pytest.mark.integration

PASSPHRASE = "lab-files"
tessera = Cli(passphrase=PASSPHRASE).aok
SEED = Seed(
    vms=(
        VmSeed(
            name="files01",
            disks=(DiskSeed(NAME, SIZE, bootable=True, layout="partitioned"),),
        ),
    )
)


@pytest.fixture
async def backed_up(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The store holding a full backup of files01, taken through the lab's engine."""
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (disk,) = FakeEngine(SEED, engine_dir).inventory.disks.values()
    assert (disk.alias, disk.provisioned_size, disk.layout) == (NAME, SIZE, "partitioned")
    raw = await asyncio.to_thread(guest_disk_copy, tmp_path_factory, tmp_path / f"{NAME}.raw")
    image = tmp_path / f"{NAME}.qcow2"
    await finish_image(raw, image, "qcow2", disk.provisioned_size)
    async with ImageioDaemon(base_dir=tmp_path) as daemon:
        engine = FakeEngine(SEED, engine_dir, images={disk.id: image}, imageio=daemon)
        async with engine:
            (tmp_path / "engine-password").write_text(SEED.password + "\n")
            config = tmp_path / "config.yaml"
            store = tmp_path / "store"
            config.write_text(
                f"stores:\n  - name: main\n    path: {store}\n"
                "engines:\n"
                f"  - name: lab\n    url: {engine.url}\n    username: {SEED.username}\n"
                f"    password_file: {tmp_path / 'engine-password'}\n"
                f"    ca_file: {engine.ca_file}\n"
            )
            await tessera("store", "init", store)
            await tessera("backup", "vm", "files01", "--config", config, "--level", "full")
    image.unlink()  # the backup is all there is
    return store


async def test_a_lab_vms_files_come_back_through_get_and_mount(
    backed_up: Path, tmp_path: Path
) -> None:
    files = guest_files(NAME)
    with Store.open(backed_up, passphrase=PASSPHRASE.encode(), writable=False) as store:
        (entry,) = store.snapshots()
        manifest = store.manifest(entry.snapshot_id)
        pool = make_cpu_pool(store.keys, manifest.chunk_size)
        try:
            async with GuestTree.open(store, pool, manifest, manifest.disks) as tree:
                kinds = {f.name: (f.fstype, f.mounted) for f in tree.filesystems}
                assert kinds == {
                    "sda1": ("ext4", True),
                    "sda2": ("xfs", True),
                    "sda3": ("ntfs", True),
                    "vg0-lv0": ("ext4", True),
                }, tree.filesystems
                got = tmp_path / "got"
                got.mkdir()
                for fs in kinds:
                    assert await tree.get(f"/{fs}", got) > 0
                for path, data in files.items():
                    assert (got / path.lstrip("/")).read_bytes() == data, path
                link, target = LINK
                assert os.readlink(got / link.lstrip("/")) == target
                await _through_mount(tree, tmp_path / "mnt", files)
        finally:
            await pool.aclose()
    # reading changed nothing in the store
    await tessera("store", "verify", backed_up)


async def _through_mount(tree: GuestTree, mnt: Path, files: dict[str, bytes]) -> None:
    mnt.mkdir()
    mounted = asyncio.Event()
    serving = asyncio.create_task(tree.mount(mnt, mounted.set))
    try:
        waiter = asyncio.create_task(mounted.wait())
        await asyncio.wait([waiter, serving], timeout=300, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert mounted.is_set(), f"the mount did not come up: {serving}"

        def read_all() -> dict[str, bytes]:
            return {path: (mnt / path.lstrip("/")).read_bytes() for path in files}

        assert await asyncio.to_thread(read_all) == files
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], check=False, capture_output=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(120):
                await serving
    assert serving.done() and serving.exception() is None
    assert not os.path.ismount(mnt)
