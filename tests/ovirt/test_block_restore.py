"""Restores into a block storage domain (issue 13 item 3): `tessera restore
--storage-domain block1` through imageio uploads and through the DataMover, against a lab
whose iSCSI domain refuses sparse raw and gives a thin qcow2 disk only the volume its
``initial_size`` asks for (the engine does not extend volumes during an upload). A thin
qcow2 disk and a sparse raw one come back as thin qcow2 disks that hold exactly the bytes
backed up; the preallocated raw disk stays raw."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.units import KiB, MiB
from engine.io import qemu
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt import volumes
from tests.integration.images import identical, reference, run
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import tessera
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

DM = "tessera-dm"
SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 160 * MiB, bootable=True),
                DiskSeed("vm1_data", 128 * MiB, format="raw", sparse=False, backup="none"),
                DiskSeed("vm1_scratch", 128 * MiB, format="raw", backup="none"),  # sparse raw
            ),
        ),
        VmSeed(name=DM, disks=(DiskSeed(f"{DM}_os", 16 * MiB, bootable=True),)),
    )
)

Lab = tuple[FakeEngine, Path, dict[str, Path]]


@pytest.fixture
async def lab(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    before = leaks.children()
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(SEED, engine_dir)  # only to learn the disk ids the seed gets
    disks = {d.alias: d for d in probe.inventory.disks.values() if d.alias.startswith("vm1")}
    images = {
        a: tmp_path / f"{a}.{'qcow2' if d.format == 'cow' else 'raw'}" for a, d in disks.items()
    }
    await build_once(
        tmp_path_factory,
        [
            DiskRequest(
                a,
                p,
                "qcow2" if disks[a].format == "cow" else "raw",
                disks[a].provisioned_size,
                template=a.endswith("_os"),
                vm="vm1",
            )
            for a, p in images.items()
        ],
    )
    # Data scattered over the sparse raw disk: more than the lab's chunk, less than its size.
    for i, offset in enumerate((0, 7 * MiB, 40 * MiB, 127 * MiB)):
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            f"write -P {0x31 + i} {offset} 640k",
            images["vm1_scratch"],
        )
    async with ImageioDaemon(base_dir=tmp_path) as daemon:
        engine = FakeEngine(
            SEED,
            engine_dir,
            images={disks[a].id: p for a, p in images.items()},
            imageio=daemon,
            datamover=DM,
            devices_dir=tmp_path / "devices",
        )
        async with engine:
            (tmp_path / "engine-password").write_text(SEED.password + "\n")
            config = tmp_path / "config.yaml"
            config.write_text(
                "stores:\n"
                f"  - name: main\n    path: {tmp_path / 'store'}\n"
                "engines:\n"
                f"  - name: lab\n    url: {engine.url}\n    username: {SEED.username}\n"
                f"    password_file: {tmp_path / 'engine-password'}\n"
                f"    ca_file: {engine.ca_file}\n"
                f"datamover:\n  vm_name: {DM}\n  by_id_dir: {tmp_path / 'devices' / 'by-id'}\n"
            )
            code, _, err = await tessera("store", "init", tmp_path / "store")
            assert code == 0, err
            yield engine, config, images
    assert leaks.children() <= before


@pytest.mark.parametrize("flow", ["imageio", "attach"])
async def test_restore_into_a_block_domain(tmp_path: Path, lab: Lab, flow: str) -> None:
    engine, config, images = lab
    refs = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", "full")
    assert code == 0, out + err
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, out + err
    (snap,) = json.loads(out)
    snapshot_id = snap["id"]

    code, out, err = await tessera(
        "restore",
        snapshot_id,
        "--config",
        config,
        "--flow",
        flow,
        "--name",
        "vm1-block",
        "--storage-domain",
        "block1",
    )
    assert code == 0, out + err
    inv = engine.inventory
    vm = next(v for v in inv.vms.values() if v.name == "vm1-block")
    restored = {inv.disks[x.disk_id].alias: inv.disks[x.disk_id] for x in vm.attachments}
    assert set(restored) == set(images)
    block1 = next(sd for sd in inv.storage_domains.values() if sd.name == "block1")
    for alias, disk in restored.items():
        assert disk.storage_domain_id == block1.id
        assert disk.status == "ok"
        image = engine.activity.images[disk.id]
        assert identical(refs[alias], image), alias
    # Thin disks are qcow2 there (sparse raw too), sized by initial_size, not the chunk.
    assert (restored["vm1_scratch"].format, restored["vm1_scratch"].sparse) == ("cow", True)
    assert (restored["vm1_os"].format, restored["vm1_data"].format) == ("cow", "raw")
    assert not restored["vm1_data"].sparse
    for alias in ("vm1_os", "vm1_scratch"):
        allocated = engine.activity.volume_sizes[engine.activity.images[restored[alias].id]]
        assert allocated > engine.faults.volume_chunk, alias


async def test_initial_size_covers_what_qemu_img_measure_needs(tmp_path: Path) -> None:
    """The estimate from the stored data is at least ``qemu-img measure`` of a qcow2 image
    holding that data, wherever the data lies, and at most the fully allocated size."""
    virtual = 1536 * MiB  # three L2 tables' worth
    raw = tmp_path / "d.raw"
    with raw.open("wb") as f:
        f.truncate(virtual)
    chunk = 256 * KiB
    offsets = [0, 3 * MiB, 511 * MiB, 512 * MiB, 1024 * MiB + 64 * KiB, virtual - chunk]
    run(
        "qemu-io",
        "-f",
        "raw",
        *[x for o in offsets for x in ("-c", f"write -P 0x7 {o} {chunk}")],
        raw,
    )
    out = await qemu.qemu_img("measure", "--output=json", "-O", "qcow2", "-f", "raw", raw)
    required = int(json.loads(out)["required"])
    estimate = await volumes.initial_size(virtual, len(offsets) * chunk)
    _, full = await volumes.measure(virtual)
    assert required <= estimate <= full
    assert await volumes.initial_size(virtual, virtual) == full


async def test_a_standby_refresh_that_outgrows_its_block_volume_runs_full(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    args = ["standby", "refresh", "vm1", "--config", config, "--cluster", "Default"]
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", "full")
    assert code == 0, out + err
    code, out, err = await tessera(*args, "--storage-domain", "block1")
    assert code == 0, out + err
    assert "full (first refresh)" in out

    # Far more new data than the 10 % vdsm adds to initial_size: the volume cannot take it.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 64M 48M", images["vm1_os"])
    refs = {a: reference(p, tmp_path / f"ref1-{a}.raw") for a, p in images.items()}
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config)
    assert code == 0, out + err
    code, out, err = await tessera(*args)
    assert code == 0, out + err
    assert "full (" in out and "on block domain block1" in out, out
    inv = engine.inventory
    vm = next(v for v in inv.vms.values() if v.name == "vm1-standby")
    for x in vm.attachments:
        disk = inv.disks[x.disk_id]
        assert identical(refs[disk.alias], engine.activity.images[disk.id]), disk.alias
