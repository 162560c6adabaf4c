"""A VM with a user snapshot, backed up by Tessera in all three flows, as a real engine allows
(API-NOTES § 11.4): the active layer is read through the chain, the bitmaps live in every
layer, an incremental after the snapshot reads only the changed blocks (the backup API on a
4.7 cluster: hybrid, its snapshot on top of the user's), restores are byte-identical to what
qemu-img reads from the active layer, and the user's snapshot is left as it was."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.units import MiB
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed, lab_id
from plugins.lab.imageio import ImageioDaemon
from tests.integration.images import identical, qemu_io, reference
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import tessera
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

DM = "tessera-dm"
SNAPSHOT = "Before upgrade"
SEED = Seed(  # cluster "Default", level 4.7: the backup API's backups are hybrid
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 160 * MiB, bootable=True),
                DiskSeed("vm1_data", 128 * MiB, format="raw", sparse=False, backup="none"),
            ),
            snapshots=(SNAPSHOT,),
        ),
        VmSeed(name=DM, disks=(DiskSeed(f"{DM}_os", 16 * MiB, bootable=True),)),
    )
)
SNAPSHOT_ID = lab_id("snapshot", f"vm1/{SNAPSHOT}")


@pytest.fixture
async def lab(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FakeEngine, Path, dict[str, Path]]]:
    before = leaks.children()
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    disks = {
        d.alias: d
        for d in FakeEngine(SEED, engine_dir).inventory.disks.values()
        if d.alias.startswith("vm1")
    }
    fmt = {a: "qcow2" if d.format == "cow" else "raw" for a, d in disks.items()}
    images = {a: tmp_path / f"{a}.{fmt[a]}" for a in disks}
    await build_once(
        tmp_path_factory,
        [
            DiskRequest(a, p, fmt[a], disks[a].provisioned_size, a.endswith("_os"), "vm1")
            for a, p in images.items()
        ],
    )
    async with (
        ImageioDaemon(base_dir=tmp_path) as daemon,
        FakeEngine(
            SEED,
            engine_dir,
            images={disks[a].id: p for a, p in images.items()},
            imageio=daemon,
            datamover=DM,
            devices_dir=tmp_path / "devices",
        ) as engine,
    ):
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
            "  device_timeout: 30\n"
        )
        code, _, err = await tessera("store", "init", tmp_path / "store")
        assert code == 0, err
        yield engine, config, images
    assert leaks.children() <= before


@pytest.mark.parametrize("flow", ["backup-api", "snapshot-imageio", "snapshot-attach"])
async def test_a_vm_with_a_user_snapshot_backs_up_and_restores(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]], flow: str
) -> None:
    engine, config, images = lab
    user = engine.activity.snapshots[SNAPSHOT_ID]
    assert set(user.volumes) == {lab_id("disk", "vm1_os"), lab_id("disk", "vm1_data")}
    backup = ("backup", "vm", "vm1", "--flow", flow, "--config", config)
    refs = [{a: reference(p, tmp_path / f"t0-{a}.raw") for a, p in images.items()}]
    code, out, err = await tessera(*backup, "--level", "full")
    assert code == 0, out + err

    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    qemu_io(images["vm1_data"], "write -P 0x44 1M 64k")  # the raw disk's qcow2 overlay
    refs.append({a: reference(p, tmp_path / f"t1-{a}.raw") for a, p in images.items()})
    code, out, err = await tessera(*backup)
    assert code == 0, out + err

    # The user's snapshot is still there, alone; the VM's data is as it was.
    assert list(engine.activity.snapshots) == [SNAPSHOT_ID]
    for alias, image in images.items():
        assert identical(refs[1][alias], image), alias
    if flow == "backup-api":
        assert len(engine.activity.hybrid) == 2  # hybrid: a snapshot on top of the user's
        assert "level incremental" in out

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    snaps = json.loads(out)
    assert len(snaps) == 2
    if flow == "backup-api":
        inc = {d["name"]: d for d in snaps[1]["disks"]}
        assert inc["vm1_os"]["attributes"]["read"] == "dirty"
    for snap, ref in zip(snaps, refs, strict=True):
        out_dir = tmp_path / f"restored-{snap['id']}"
        out_dir.mkdir()
        code, out, err = await tessera(
            "restore", snap["id"], "--store", config.parent / "store", "--to", out_dir
        )
        assert code == 0, out + err
        for disk in snap["disks"]:
            assert identical(ref[disk["name"]], next(out_dir.glob(f"{disk['name']}.*")))
