"""Flow 3, LAN free, end to end against the lab: `tessera backup vm --flow snapshot-attach`
(snapshot, its disks attached to the DataMover VM and read as local devices: the lab's
nbdfuse files under its by-id directory), a guest change, a second backup, then
`tessera restore --flow attach` into a new VM (new disks attached to the DataMover, written
through their devices, detached, attached to the new VM). The lab runs no ovirt-imageio at
all: no byte goes over an image transfer. Checked: restored disks byte-identical to the VM's
disks at backup time, the VM's data unchanged by the snapshot merge, nothing left on the
engine (snapshot, attachment, transfer, disk, VM) after success, failure or a killed run."""

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk
import pytest

from engine.config.models import DataMoverSection, EngineSection
from engine.core.units import MiB
from engine.io.exports import export_records
from engine.io.qemu import QemuNbd
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.devices import mounts_under
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed, lab_id
from plugins.ovirt import PLUGIN
from plugins.ovirt.attach import AttachSession
from plugins.ovirt.datamover import OvirtAttachError, find_devices, wait_device
from plugins.ovirt.sources import vm_sources
from tests.contract.harness import nbd_servers_of
from tests.integration.images import identical, qemu_io, reference
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import ROOT, tessera
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

DM = "tessera-dm"
DM_OS = lab_id("disk", f"{DM}_os")
VM1_OS = lab_id("disk", "vm1_os")
SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 160 * MiB, bootable=True),
                DiskSeed("vm1_data", 128 * MiB, format="raw", sparse=False, backup="none"),
            ),
        ),
        VmSeed(name=DM, disks=(DiskSeed(f"{DM}_os", 16 * MiB, bootable=True),)),
    )
)


class Lab:
    def __init__(self, engine: FakeEngine, tmp: Path, images: dict[str, Path]) -> None:
        self.engine = engine
        self.tmp = tmp
        self.images = images
        self.by_id = tmp / "devices" / "by-id"

    def config(self, name: str, *, by_id: Path | None = None, timeout: float = 30) -> Path:
        path = self.tmp / name
        path.write_text(
            "stores:\n"
            f"  - name: main\n    path: {self.tmp / 'store'}\n"
            "engines:\n"
            f"  - name: lab\n    url: {self.engine.url}\n    username: {SEED.username}\n"
            f"    password_file: {self.tmp / 'engine-password'}\n"
            f"    ca_file: {self.engine.ca_file}\n"
            f"datamover:\n  vm_name: {DM}\n  by_id_dir: {by_id or self.by_id}\n"
            f"  device_timeout: {timeout}\n"
        )
        return path

    def section(self) -> EngineSection:
        return EngineSection(
            name="lab",
            url=self.engine.url,
            username=SEED.username,
            password_file=self.tmp / "engine-password",
            ca_file=self.engine.ca_file,
        )

    async def view(self) -> dict[str, Any]:
        """What the engine holds: VMs (name → disk aliases), the DataMover's attachments,
        vm1's snapshots, transfers, disk ids."""

        def read() -> dict[str, Any]:
            conn = sdk.Connection(
                url=self.engine.url,
                username=SEED.username,
                password=SEED.password,
                ca_file=str(self.engine.ca_file),
            )
            try:
                system = conn.system_service()
                vms = system.vms_service()
                out: dict[str, Any] = {"vms": {}, "disks": set()}
                for vm in vms.list():
                    attached = vms.vm_service(vm.id).disk_attachments_service().list()
                    out["vms"][vm.name] = {a.disk.id for a in attached}
                    if vm.name == "vm1":
                        snaps = vms.vm_service(vm.id).snapshots_service().list()
                        out["snapshots"] = [str(s.snapshot_type.value) for s in snaps]
                out["disks"] = {d.id for d in system.disks_service().list()}
                out["transfers"] = list(system.image_transfers_service().list())
                return out
            finally:
                conn.close()

        return await asyncio.to_thread(read)

    async def clean(self) -> dict[str, Any]:
        """Assert nothing of a run is left; return the view."""
        v = await self.view()
        assert v["snapshots"] == ["active"], v
        assert v["vms"][DM] == {DM_OS}, v  # its own disk only
        assert v["transfers"] == []
        assert self.engine.devices is not None and not self.engine.devices.plugged
        assert not mounts_under(self.tmp / "devices")
        return v


@pytest.fixture
async def lab(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    async with attach_lab(tmp_path, tmp_path_factory) as made:
        yield made


@contextlib.asynccontextmanager
async def attach_lab(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Lab]:
    """vm1 (two disks) and the DataMover in a lab with no imageio; the store initialised.
    Also used by ``test_idle_transfers`` (the slow first disk in the LAN-free flow)."""
    before = leaks.children()
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(SEED, engine_dir)  # only to learn the disk ids the seed gets
    disks = {d.alias: d for d in probe.inventory.disks.values() if d.alias.startswith("vm1")}
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
    engine = FakeEngine(
        SEED,
        engine_dir,
        images={disks[a].id: p for a, p in images.items()},
        datamover=DM,
        devices_dir=tmp_path / "devices",
    )  # no imageio: the flow must not need it
    async with engine:
        (tmp_path / "engine-password").write_text(SEED.password + "\n")
        lab = Lab(engine, tmp_path, images)
        code, _, err = await tessera("store", "init", tmp_path / "store")
        assert code == 0, err
        yield lab
    assert not mounts_under(tmp_path)
    assert leaks.children() <= before


async def test_attach_flow_twice_then_restore_through_the_datamover(lab: Lab) -> None:
    tmp, images = lab.tmp, lab.images
    config = lab.config("config.yaml")
    refs = [{a: reference(p, tmp / f"t0-{a}.raw") for a, p in images.items()}]
    backup = ("backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", config)
    code, out, err = await tessera(*backup, "--level", "full")
    assert code == 0, out + err

    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    refs.append({a: reference(p, tmp / f"t1-{a}.raw") for a, p in images.items()})
    code, out, err = await tessera(*backup)
    assert code == 0, out + err

    for alias, image in images.items():  # the snapshot merge left the VM's data as it was
        assert identical(refs[1][alias], image), alias
    await lab.clean()
    codes = [e.code for e in lab.engine.activity.events]
    assert codes.count(2016) == codes.count(2018) == 4  # two disks, twice

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    docs = json.loads(out)
    assert len(docs) == 2
    for doc in docs:
        for disk in doc["disks"]:
            assert disk["attributes"]["transport"] == "attach"
            assert disk["attributes"]["consistency"] == "application"

    # The first backup to local images, the second through the DataMover into a new VM.
    out_dir = tmp / "restored-0"
    out_dir.mkdir()
    code, out, err = await tessera(
        "restore", docs[0]["id"], "--store", tmp / "store", "--to", out_dir
    )
    assert code == 0, out + err
    for disk in docs[0]["disks"]:
        assert identical(refs[0][disk["name"]], next(out_dir.glob(f"{disk['name']}.*")))

    before = await lab.view()
    code, out, err = await tessera(
        "restore", docs[1]["id"], "--config", config, "--flow", "attach", "--name", "vm1-r"
    )
    assert code == 0, out + err
    after = await lab.clean()
    new_disks = after["vms"]["vm1-r"]
    assert len(new_disks) == 2 and not new_disks & before["disks"]
    assert after["disks"] == before["disks"] | new_disks
    inventory = lab.engine.inventory
    for disk_id in new_disks:
        alias = inventory.disks[disk_id].alias
        image = lab.engine.activity.images[disk_id]
        assert identical(refs[1][alias], image), alias
    restored = {inventory.disks[d].alias: inventory.disks[d] for d in new_disks}
    assert restored["vm1_data"].format == "raw" and restored["vm1_os"].format == "cow"


async def test_a_device_that_never_appears_leaves_nothing(lab: Lab) -> None:
    nowhere = lab.tmp / "no-devices"
    nowhere.mkdir()
    bad = lab.config("bad.yaml", by_id=nowhere, timeout=1)
    before = await lab.view()
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", bad, "--level", "full"
    )
    assert code != 0
    assert f"no device with serial {VM1_OS[:20]}" in out + err
    assert await lab.clean() == before

    good = lab.config("good.yaml")
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", good
    )
    assert code == 0, out + err
    code, out, _ = await tessera("snapshots", "--config", good, "--json")
    (doc,) = json.loads(out)
    code, out, err = await tessera("restore", doc["id"], "--config", bad, "--flow", "attach")
    assert code != 0, out + err
    assert "no device with serial" in out + err
    assert await lab.clean() == before  # the new disk detached and deleted, no VM


async def test_recover_detaches_what_a_killed_run_left(lab: Lab) -> None:
    before_images = {a: reference(p, lab.tmp / f"b-{a}.raw") for a, p in lab.images.items()}
    before = await lab.view()
    section = DataMoverSection(vm_name=DM, by_id_dir=lab.by_id, device_timeout=30)
    found = await vm_sources(lab.section(), ["vm1"], "snapshot-attach", datamover=section)
    journal: dict[str, object] = {}

    async def record(key: str, value: object) -> None:
        journal[key] = value

    try:
        session = await found.sources[0].open(None, (), "tessera-x", 2, record)
        assert isinstance(session, AttachSession)
    finally:
        await found.client.close()
    # As if the process died here: the disks stay attached. The devices are read directly,
    # so no server was started (none names a device) and none is journaled.
    assert set(journal) == {"engine", "snapshot", "attachments"}
    assert nbd_servers_of([lab.by_id]) == []
    v = await lab.view()
    assert len(v["vms"][DM]) == 3 and v["snapshots"] == ["active", "regular"]
    # A journal of a version that read each device through qemu-nbd names the exports:
    # recovery still stops them, before detaching.
    exports = []
    for device in session.devices:
        export = QemuNbd(device.path, "raw", read_only=True)
        export.prepare()
        exports.append(export)
        await export.start()
        await device.close()  # the killed process's descriptors die with it
    journal["attach_exports"] = export_records(exports)

    done = await PLUGIN.recover(journal, False)
    assert sum(d.startswith("stopped qemu-nbd") for d in done) == 2, done
    assert sum(d.startswith("detached disk") for d in done) == 2, done
    assert done[-1].startswith("removed snapshot"), done
    for export in exports:
        await export.stop()  # reap the killed processes (they are this test's children)
    assert await lab.clean() == before
    for alias, image in lab.images.items():
        assert identical(before_images[alias], image), alias


async def test_a_cancelled_open_detaches_and_removes_the_snapshot(lab: Lab) -> None:
    before = await lab.view()
    nowhere = lab.tmp / "no-devices"
    nowhere.mkdir()
    section = DataMoverSection(vm_name=DM, by_id_dir=nowhere, device_timeout=60)
    found = await vm_sources(lab.section(), ["vm1"], "snapshot-attach", datamover=section)
    dm = next(v for v in lab.engine.inventory.vms.values() if v.name == DM)

    async def ignore(key: str, value: object) -> None:
        return None

    try:
        task = asyncio.create_task(found.sources[0].open(None, (), "tessera-x", 1, ignore))
        for _ in range(200):  # until the first disk is attached: open waits for its device
            if len(lab.engine.inventory.vms[dm.id].attachments) > 1:
                break
            await asyncio.sleep(0.05)
        assert len(lab.engine.inventory.vms[dm.id].attachments) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await found.client.close()
    assert await lab.clean() == before


async def test_a_killed_restore_is_undone_by_the_next_start(lab: Lab) -> None:
    config = lab.config("config.yaml")
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", config
    )
    assert code == 0, out + err
    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    (doc,) = json.loads(out)
    before = await lab.view()
    assert lab.engine.devices is not None
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli.main",
        *("restore", doc["id"], "--config", str(config), "--flow", "attach", "--name", "vm1-k"),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TESSERA_PASSPHRASE": "flow-test"},
    )
    try:
        for _ in range(6000):  # the new disk's device is plugged: the restore writes it now
            if lab.engine.devices.plugged or proc.returncode is not None:
                break
            await asyncio.sleep(0.005)
        assert lab.engine.devices.plugged, "the restore never attached a disk"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    left = await lab.view()
    # Killed once the first new disk was plugged; the second (disks are restored two at
    # once) is made only after the first one's device serves, which may just have happened.
    assert len(left["vms"][DM]) in (2, 3), left
    assert len(left["disks"]) - len(before["disks"]) in (1, 2), left

    # The next command that opens the store for writing detaches and deletes, then restores.
    code, out, err = await tessera(
        "restore", doc["id"], "--config", config, "--flow", "attach", "--name", "vm1-k"
    )
    assert code == 0, out + err
    after = await lab.clean()
    assert set(after["vms"]) == set(before["vms"]) | {"vm1-k"}
    assert after["disks"] == before["disks"] | after["vms"]["vm1-k"]


async def test_device_matching_by_serial_prefix(tmp_path: Path) -> None:
    disk = "0b9e1c7a-3f2d-4c55-9a8e-6d1f2e3a4b5c"
    other = "0b9e1c7a-3f2d-4c55-0000-000000000000"  # shares 19 characters, not 20
    target = tmp_path / "sdb"
    target.write_bytes(b"")
    for name in (
        f"scsi-0QEMU_QEMU_HARDDISK_{disk[:20]}-part1",  # a partition: never the disk
        f"virtio-{other[:20]}",
        "wwn-0x5000c500a1b2c3d4",
    ):
        (tmp_path / name).symlink_to(target)
    assert find_devices(tmp_path, disk) == []
    with pytest.raises(OvirtAttachError, match=f"no device with serial {disk[:20]}"):
        await wait_device(tmp_path, disk, 0.2, DM)
    full = tmp_path / f"scsi-0QEMU_QEMU_HARDDISK_{disk}"  # a QEMU giving the whole serial
    full.symlink_to(target)
    assert await wait_device(tmp_path, disk, 0.2, DM) == full
    (tmp_path / f"virtio-{disk[:20]}").symlink_to(target)  # the same device twice is fine
    assert len(find_devices(tmp_path, disk)) == 2
    other_target = tmp_path / "sdc"
    other_target.write_bytes(b"")
    (tmp_path / f"scsi-SQEMU_QEMU_HARDDISK_{disk[:20]}").symlink_to(other_target)
    with pytest.raises(OvirtAttachError, match="several devices match"):
        await wait_device(tmp_path, disk, 0.2, DM)
