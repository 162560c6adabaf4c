"""The incremental-backup-API flow end to end: `tessera backup vm` against the lab (fake
engine + real ovirt-imageio + qemu-nbd over real qcow2/raw images), restore into local
images, byte comparison with the VM's disks at backup time, and no leftovers on the engine."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

from engine.core.units import MiB
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from tests.cli import Cli
from tests.integration.images import identical, qemu_io, reference
from tests.lab_disks import build_once

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = Cli(passphrase="flow-test")
tessera = CLI.arun  # (exit status, stdout, stderr)

SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            nics=("nic1", "backend"),  # two NICs: a restore must bring both back (OVF)
            disks=(
                DiskSeed("vm1_os", 256 * MiB, bootable=True),
                DiskSeed("vm1_data", 192 * MiB, format="raw", sparse=False, backup="none"),
            ),
        ),
    )
)


@pytest.fixture
async def lab(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FakeEngine, Path, dict[str, Path]]]:
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(SEED, engine_dir)  # only to learn the disk ids the seed gets
    disks = {d.alias: d for d in probe.inventory.disks.values()}
    images = {
        alias: tmp_path / f"{alias}.{'qcow2' if d.format == 'cow' else 'raw'}"
        for alias, d in disks.items()
    }
    await build_once(
        tmp_path_factory,
        [
            DiskRequest(
                alias,
                path,
                "qcow2" if disks[alias].format == "cow" else "raw",
                disks[alias].provisioned_size,
                template=alias.endswith("_os"),
                vm="vm1",
            )
            for alias, path in images.items()
        ],
    )
    async with ImageioDaemon(base_dir=tmp_path) as daemon:
        engine = FakeEngine(
            SEED, engine_dir, images={disks[a].id: p for a, p in images.items()}, imageio=daemon
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
            )
            code, _, err = await tessera("store", "init", tmp_path / "store")
            assert code == 0, err
            yield engine, config, images


async def test_full_then_incremental_then_restore(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]]
) -> None:
    engine, config, images = lab
    refs = [{a: reference(p, tmp_path / f"t0-{a}.raw") for a, p in images.items()}]
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", "full")
    assert code == 0, out + err
    assert "level full" in out

    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    refs.append({a: reference(p, tmp_path / f"t1-{a}.raw") for a, p in images.items()})
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config)
    assert code == 0, out + err
    assert "level incremental" in out

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    snaps = json.loads(out)
    assert [s["level"] for s in snaps] == ["full", "incremental"]
    inc = {d["name"]: d for d in snaps[1]["disks"]}
    assert inc["vm1_os"]["attributes"]["read"] == "dirty"
    assert "backup_mode=full" in inc["vm1_data"]["attributes"]["fallback"]
    for snap, ref in zip(snaps, refs, strict=True):
        out_dir = tmp_path / f"restored-{snap['id']}"
        out_dir.mkdir()
        code, out, err = await tessera(
            "restore", snap["id"], "--store", tmp_path / "store", "--to", out_dir
        )
        assert code == 0, out + err
        for disk in snap["disks"]:
            restored = next(out_dir.glob(f"{disk['name']}.*"))
            assert identical(ref[disk["name"]], restored), disk["name"]

    # Nothing left behind on the engine: every backup finished, no transfer open.
    def leftovers() -> tuple[list[str], list[str]]:
        conn = sdk.Connection(
            url=engine.url,
            username=SEED.username,
            password=SEED.password,
            ca_file=str(engine.ca_file),
        )
        try:
            system = conn.system_service()
            vm = system.vms_service().list(search="name=vm1")[0]
            backups = system.vms_service().vm_service(vm.id).backups_service().list()
            transfers = system.image_transfers_service().list()
            return [str(b.phase) for b in backups], [str(t.phase) for t in transfers]
        finally:
            conn.close()

    backups, transfers = await asyncio.to_thread(leftovers)
    assert backups and all(p.endswith("succeeded") for p in backups), backups
    assert all("finished" in p for p in transfers), transfers
