"""Restore into the engine as a new VM, end to end: `tessera backup vm` (backup-API flow)
against the lab, then `tessera restore <id> --config …`: new disks uploaded through image
transfers (real ovirt-imageio + qemu-nbd into the fake engine's new images), the VM created
from the stored OVF and the disks attached. Checked with the real ovirtsdk4 and
`qemu-img compare`; failing restores must leave no new disk and no new VM behind."""

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

from engine.core.ids import chunk_id_from_hex
from engine.store.chunk_store import Store
from plugins.lab.engine.server import FakeEngine
from tests.integration.images import identical, reference
from tests.ovirt.test_backup_api_flow import SEED, lab, tessera
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with the backup-API flow test

Lab = tuple[FakeEngine, Path, dict[str, Path]]


@dataclass(frozen=True)
class EngineView:
    vms: dict[str, dict[str, object]]  # name → facts
    disks: set[str]  # ids
    transfers: list[str]  # phases


def view(engine: FakeEngine) -> EngineView:
    conn = sdk.Connection(
        url=engine.url, username=SEED.username, password=SEED.password, ca_file=str(engine.ca_file)
    )
    try:
        system = conn.system_service()
        vms: dict[str, dict[str, object]] = {}
        for vm in system.vms_service().list():
            service = system.vms_service().vm_service(vm.id)
            disks = {}
            for a in service.disk_attachments_service().list():
                disk = system.disks_service().disk_service(a.disk.id).get()
                disks[disk.alias] = {
                    "id": disk.id,
                    "interface": str(a.interface.value),
                    "bootable": a.bootable,
                    "active": a.active,
                    "format": str(disk.format.value),
                    "size": disk.provisioned_size,
                    "status": str(disk.status.value),
                }
            vms[vm.name] = {
                "id": vm.id,
                "status": str(vm.status.value),
                "cluster": system.clusters_service().cluster_service(vm.cluster.id).get().name,
                "memory": vm.memory,
                "sockets": vm.cpu.topology.sockets,
                "cores": vm.cpu.topology.cores,
                "os": vm.os.type,
                "disks": disks,
            }
        disk_ids = {d.id for d in system.disks_service().list()}
        transfers = [str(t.phase.value) for t in system.image_transfers_service().list()]
        return EngineView(vms, disk_ids, transfers)
    finally:
        conn.close()


async def full_backup(
    config: Path, tmp_path: Path, images: dict[str, Path]
) -> tuple[str, dict[str, Path]]:
    refs = {a: reference(p, tmp_path / f"t0-{a}.raw") for a, p in images.items()}
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", "full")
    assert code == 0, out + err
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, out + err
    (snap,) = json.loads(out)
    return snap["id"], refs


async def test_restore_as_a_new_vm(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    snapshot_id, refs = await full_backup(config, tmp_path, images)
    before = leaks.children()

    code, out, err = await tessera(
        "restore", snapshot_id, "--config", config, "--name", "vm1-restored"
    )
    assert code == 0, out + err
    after = await asyncio.to_thread(view, engine)
    new = after.vms["vm1-restored"]
    assert f"restored VM vm1-restored id {new['id']}" in out
    original = after.vms["vm1"]
    assert new["id"] != original["id"]
    assert new["status"] == "down"
    for fact in ("cluster", "memory", "sockets", "cores", "os"):
        assert new[fact] == original[fact], fact
    assert new["cores"] == 2  # the seed's default, carried by the OVF
    by_name = {v.name: v for v in engine.inventory.vms.values()}
    assert by_name["vm1-restored"].nics == by_name["vm1"].nics == ("nic1", "backend")
    new_disks = new["disks"]
    assert isinstance(new_disks, dict)
    old_disks = original["disks"]
    assert isinstance(old_disks, dict)
    assert set(new_disks) == set(old_disks) == set(images)
    for alias, disk in new_disks.items():
        old = old_disks[alias]
        assert disk["id"] != old["id"]
        for fact in ("interface", "bootable", "format", "size"):
            assert disk[fact] == old[fact], (alias, fact)
        assert disk["active"] is True
        assert disk["status"] == "ok"
        image = engine.activity.images[disk["id"]]
        assert image.parent == engine.activity.images_dir
        assert identical(refs[alias], image), alias
    assert after.transfers and all(p.startswith("finished") for p in after.transfers)
    assert leaks.children() <= before


async def corrupt_disk_data(store_path: Path, snapshot_id: str) -> None:
    """Flip a byte in the middle of every pack, sparing the OVF's record: the restore then
    fails on a disk chunk, after disks were created."""
    with Store.open(store_path, passphrase=b"flow-test", writable=False) as store:
        manifest = store.manifest(snapshot_id)
        assert manifest.config is not None
        spared = store.index.lookup(chunk_id_from_hex(manifest.config.chunk_id))
        assert spared is not None
        packs = sorted(store.layout.packs.glob("*/*.pack"))
    assert packs
    for pack in packs:
        size = pack.stat().st_size
        pos = size // 2
        if pack.stem == spared.pack and spared.offset <= pos < spared.offset + spared.length:
            pos = spared.offset + spared.length + 64
        assert pos < size
        with open(pack, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("failure", ["storage-domain", "name-in-use", "corrupt-chunk"])
async def test_a_failed_restore_leaves_nothing(tmp_path: Path, lab: Lab, failure: str) -> None:
    engine, config, images = lab
    snapshot_id, _ = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)
    args: list[str | Path] = ["restore", snapshot_id, "--config", config]
    if failure == "storage-domain":  # refused by the pre-flight, before the first disk
        args += ["--storage-domain", "nosuch"]
    elif failure == "name-in-use":  # the same (it failed once every disk was uploaded)
        args += ["--name", "vm1"]
    else:
        await corrupt_disk_data(tmp_path / "store", snapshot_id)
    code, out, err = await tessera(*args)
    assert code != 0, out + err
    after = await asyncio.to_thread(view, engine)
    assert set(after.vms) == set(before.vms) == {"vm1"}
    assert after.disks == before.disks
    assert all(p.startswith("finished") for p in after.transfers), after.transfers
    images_dir = engine.activity.images_dir
    assert images_dir is not None
    assert not images_dir.exists() or not any(images_dir.iterdir())
    if failure == "corrupt-chunk":
        assert "corrupt" in (out + err).lower()
        assert any(p == "finished_cleanup" for p in after.transfers)  # cancelled mid-upload
    else:
        assert "the target is not ready; nothing was created" in err, out + err
        assert after.transfers == before.transfers  # not one byte moved


async def test_one_disk_restored_into_an_existing_vm(tmp_path: Path, lab: Lab) -> None:
    """`--disk D --into-vm VM`: one new disk, attached (not bootable) to the existing VM,
    holding the disk's data at backup time; the VM and its own disks are untouched."""
    engine, config, images = lab
    snapshot_id, refs = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)

    code, out, err = await tessera(
        "restore", snapshot_id, "--config", config, "--disk", "vm1_data", "--into-vm", "vm1"
    )
    assert code == 0, out + err
    after = await asyncio.to_thread(view, engine)
    assert set(after.vms) == set(before.vms)  # no VM created
    vm1 = after.vms["vm1"]
    assert f"disks attached to VM vm1 id {vm1['id']}" in out
    disks = vm1["disks"]
    assert isinstance(disks, dict)
    old_disks = before.vms["vm1"]["disks"]
    assert isinstance(old_disks, dict)
    assert set(disks) == set(old_disks) | {"vm1_data-restored"}
    for alias, facts in old_disks.items():
        assert disks[alias] == facts  # the VM's own disks are as they were
    restored = disks["vm1_data-restored"]
    assert restored["bootable"] is False and restored["active"] is True
    assert identical(refs["vm1_data"], engine.activity.images[restored["id"]])
    assert after.disks == before.disks | {restored["id"]}


async def test_into_an_unknown_vm_fails_before_creating_anything(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    snapshot_id, _ = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)
    code, out, err = await tessera(
        "restore", snapshot_id, "--config", config, "--disk", "vm1_os", "--into-vm", "nope"
    )
    assert code == 2, out + err
    assert "restore into VM 'nope': the engine has no such VM" in err
    after = await asyncio.to_thread(view, engine)
    assert after.disks == before.disks and set(after.vms) == set(before.vms)
