"""Direct-LUN and shareable disks (API-NOTES § 3, § 4.2) against the lab, which serves them
as the engine does: a LUN disk with ``storage_type=lun``, ``lun_storage`` and no
provisioned_size; a shareable disk with ``shareable=true``, left out of backups and
snapshots. Inventory lists both; every backup flow skips both, records why in the snapshot
(tag ``skipped_disks``) and the job's notes, and never names them in a backup request, a
snapshot or a transfer. The VM's other disk is backed up and restores byte-identical."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config.models import EngineSection
from engine.core.units import GiB, MiB
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed, lab_id
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt import inventory
from plugins.ovirt.client import EngineClient, EngineConfig
from tests.integration.images import identical, reference
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import tessera

pytestmark = pytest.mark.integration

DM = "tessera-dm"
SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 160 * MiB, bootable=True),
                DiskSeed(
                    "vm1_quorum",
                    128 * MiB,
                    format="raw",
                    sparse=False,
                    backup="none",
                    shareable=True,
                ),
                DiskSeed(
                    "vm1_lun",
                    10 * GiB,
                    format="raw",
                    sparse=False,
                    backup="none",
                    storage_type="lun",
                ),
            ),
        ),
        VmSeed(name=DM, disks=(DiskSeed(f"{DM}_os", 16 * MiB, bootable=True),)),
    )
)
OS, QUORUM, LUN = (lab_id("disk", a) for a in ("vm1_os", "vm1_quorum", "vm1_lun"))


@pytest.fixture
async def lab(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FakeEngine, Path, dict[str, Path]]]:
    images = {"vm1_os": tmp_path / "vm1_os.qcow2", "vm1_quorum": tmp_path / "vm1_quorum.raw"}
    await build_once(
        tmp_path_factory,
        [
            DiskRequest("vm1_os", images["vm1_os"], "qcow2", 160 * MiB, template=True, vm="vm1"),
            DiskRequest("vm1_quorum", images["vm1_quorum"], "raw", 128 * MiB, vm="vm1"),
        ],
    )
    (tmp_path / "engine").mkdir()
    async with ImageioDaemon(base_dir=tmp_path) as daemon:
        engine = FakeEngine(
            SEED,
            tmp_path / "engine",
            images={lab_id("disk", a): p for a, p in images.items()},
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
                "  device_timeout: 30\n"
            )
            code, _, err = await tessera("store", "init", tmp_path / "store")
            assert code == 0, err
            yield engine, config, images


async def test_inventory_lists_lun_and_shareable_disks(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]]
) -> None:
    engine = lab[0]
    section = EngineSection(
        name="lab",
        url=engine.url,
        username=SEED.username,
        password_file=tmp_path / "engine-password",
        ca_file=engine.ca_file,
    )
    async with EngineClient(EngineConfig.from_section(section)) as client:
        (vm,) = await inventory.vms(client, name_glob="vm1")
        one = await inventory.vm(client, vm.id)
    for found in (vm, one):
        disks = {d.id: d for d in found.disks}
        assert disks[LUN].storage_type == "lun"
        assert disks[LUN].provisioned_size == 10 * GiB  # the LUN's size
        assert "lun" in (disks[LUN].skip_reason or "")
        assert disks[QUORUM].shareable
        assert "shareable" in (disks[QUORUM].skip_reason or "")
        assert disks[OS].skip_reason is None


@pytest.mark.parametrize("flow", ["backup-api", "snapshot-imageio", "snapshot-attach"])
async def test_every_flow_skips_them_with_the_reason(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]], flow: str
) -> None:
    engine, config, images = lab
    ref = reference(images["vm1_os"], tmp_path / "t0.raw")
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--flow", flow)
    assert code == 0, out + err
    assert "vm1_lun skipped" in out and "vm1_quorum skipped" in out, out

    # Neither disk was ever in a backup request, a snapshot or a transfer.
    activity = engine.activity
    for b in activity.backups.values():
        assert set(b.disk_ids) == {OS}
    assert {t.disk_id for t in activity.transfers.values()} <= {OS}
    assert not any(
        "vm1_quorum" in e.description or "vm1_lun" in e.description for e in activity.events
    )

    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, err
    (snap,) = json.loads(out)
    assert [d["name"] for d in snap["disks"]] == ["vm1_os"]
    skipped = snap["tags"]["skipped_disks"]
    assert "vm1_lun: a lun disk" in skipped and "vm1_quorum: a shareable disk" in skipped

    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    code, out, err = await tessera(
        "restore", snap["id"], "--store", tmp_path / "store", "--to", out_dir
    )
    assert code == 0, out + err
    assert identical(ref, next(out_dir.glob("vm1_os.*")))
