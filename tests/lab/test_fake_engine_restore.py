"""The fake engine's restore endpoints (API-NOTES § 8) driven by the real ovirtsdk4: new disks
(images made with qemu-img, uploaded through real ovirt-imageio), VMs from the OVF the fake
generates or from plain fields, disk attachments, deletes, and the engine's refusals."""

from dataclasses import replace
from functools import partial
from pathlib import Path

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from engine.core.units import KiB, MiB
from engine.io import qemu
from plugins.lab.engine import lab_id
from plugins.lab.engine.clock import FakeClock
from plugins.lab.engine.ovf import parse_ovf, vm_ovf
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.disks import delete_disk
from plugins.ovirt.imageio import ImageioDisk
from tests.lab.polling import Client, steps
from tests.lab.test_fake_engine_backup import (
    VM_ID,
    Lab,
    fault,
    finalize_transfer,
    lab,
    nothing_left_behind,
    raw_copy,
)

pytestmark = pytest.mark.integration

__all__ = ["lab", "nothing_left_behind"]  # fixtures shared with the backup tests

SD_ID = lab_id("sd", "data1")


def add_disk(conn: sdk.Connection, **fields: object) -> types.Disk:
    body = {
        "alias": "new",
        "provisioned_size": 2 * MiB,
        "format": types.DiskFormat.COW,
        "sparse": True,
        "storage_domains": [types.StorageDomain(name="data1")],
    } | fields
    return conn.system_service().disks_service().add(types.Disk(**body))


def remove_disk(conn: sdk.Connection, disk_id: str) -> None:
    conn.system_service().disks_service().disk_service(disk_id).remove()


def get_disk(conn: sdk.Connection, disk_id: str) -> types.Disk:
    return conn.system_service().disks_service().disk_service(disk_id).get()


def disk_ok(conn: Client, disk_id: str) -> types.Disk:
    """Poll a new disk until ``ok`` (SDK-EX ``upload_disk.py``), stepping the clock."""
    for _ in steps(conn):
        disk = get_disk(conn, disk_id)
        if disk.status == types.DiskStatus.OK:
            return disk
        assert disk.status == types.DiskStatus.LOCKED
    raise AssertionError(f"disk {disk_id} stuck in {disk.status}")


def upload(conn: Client, disk_id: str) -> types.ImageTransfer:
    transfers = conn.system_service().image_transfers_service()
    t = transfers.add(
        types.ImageTransfer(
            disk=types.Disk(id=disk_id),
            direction=types.ImageTransferDirection.UPLOAD,
            format=types.DiskFormat.RAW,
        )
    )
    for _ in steps(conn):
        t = transfers.image_transfer_service(t.id).get()
        if t.phase == types.ImageTransferPhase.TRANSFERRING:
            return t
    raise AssertionError(f"transfer stuck in {t.phase}")


def vm_config(conn: sdk.Connection) -> str:
    vm = conn.system_service().vms_service().vm_service(VM_ID).get(all_content=True)
    data = vm.initialization.configuration.data
    assert isinstance(data, str)
    return data


def add_vm(conn: sdk.Connection, body: types.Vm) -> types.Vm:
    return conn.system_service().vms_service().add(body)


def ovf_vm(name: str, ovf: str, regenerate: bool = True) -> types.Vm:
    return types.Vm(
        name=name,
        cluster=types.Cluster(name="Default"),
        initialization=types.Initialization(
            configuration=types.Configuration(type=types.ConfigurationType.OVF, data=ovf),
            regenerate_ids=regenerate,
        ),
    )


def attach(conn: sdk.Connection, vm_id: str, disk_id: str, **fields: object) -> object:
    body = {"interface": types.DiskInterface.VIRTIO, "bootable": True, "active": True} | fields
    service = conn.system_service().vms_service().vm_service(vm_id)
    return service.disk_attachments_service().add(
        types.DiskAttachment(disk=types.Disk(id=disk_id), **body)
    )


def test_parse_ovf_reads_back_what_vm_ovf_writes() -> None:
    from plugins.lab.engine import FakeEngine, Seed, VmSeed
    from plugins.lab.engine.state import DiskSeed

    seed = Seed(
        vms=(
            VmSeed(
                "a",
                memory=3 * 1024 * MiB,
                sockets=2,
                cores=4,
                nics=("eth0", "eth1"),
                disks=(DiskSeed("a_os", MiB, interface="sata", bootable=True),),
            ),
        )
    )
    inv = FakeEngine(seed, Path("/nonexistent")).inventory
    vm = inv.vms[lab_id("vm", "a")]
    parsed = parse_ovf(vm_ovf(inv, vm))
    assert (parsed.vm_id, parsed.name, parsed.os_type) == (vm.id, "a", vm.os_type)
    assert (parsed.memory, parsed.sockets, parsed.cores) == (3 * 1024 * MiB, 2, 4)
    assert parsed.nics == ("eth0", "eth1")
    (disk,) = parsed.disks
    assert (disk.disk_id, disk.alias, disk.interface, disk.bootable) == (
        lab_id("disk", "a_os"),
        "a_os",
        "sata",
        True,
    )
    with pytest.raises(ValueError, match="not XML"):
        parse_ovf("<ovf")


async def test_new_disk_upload_and_delete(lab: Lab) -> None:
    disk = await lab.sdk(add_disk)
    assert disk.status == types.DiskStatus.LOCKED
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    image = lab.engine.activity.images[disk.id]
    info = await qemu.info(image)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 2 * MiB)

    transfer = await lab.sdk(partial(upload, disk_id=disk.id))
    # The engine locks the image it transfers: the disk shows locked until the transfer ends.
    assert (await lab.sdk(partial(get_disk, disk_id=disk.id))).status == types.DiskStatus.LOCKED
    data = b"\x5a" * (64 * KiB)
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as target:
        writer = await target.open_writer()
        try:
            await writer.write(MiB, data)
            await writer.flush()
        finally:
            await writer.close()
    e = await lab.sdk(
        fault(lambda c: c.system_service().disks_service().disk_service(disk.id).remove())
    )
    assert e.code == 409  # the upload is in progress
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    assert (await lab.sdk(partial(get_disk, disk_id=disk.id))).status == types.DiskStatus.OK
    copy = await raw_copy(image, lab.tmp)
    assert copy[MiB : MiB + len(data)] == data
    assert not any(copy[:MiB])

    await lab.sdk(lambda c: c.system_service().disks_service().disk_service(disk.id).remove())
    assert not image.exists()
    e = await lab.sdk(fault(partial(get_disk, disk_id=disk.id)))
    assert isinstance(e, sdk.NotFoundError)


async def test_cancelled_upload_leaves_the_disk_illegal(lab: Lab) -> None:
    disk = await lab.sdk(partial(add_disk, format=types.DiskFormat.RAW, sparse=False))
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    assert (await qemu.info(lab.engine.activity.images[disk.id]))["format"] == "raw"
    transfer = await lab.sdk(partial(upload, disk_id=disk.id))

    def cancel(conn: Client) -> None:
        service = conn.system_service().image_transfers_service()
        service.image_transfer_service(transfer.id).cancel()
        for _ in steps(conn):
            if service.image_transfer_service(transfer.id).get().phase.value.startswith("finished"):
                return
        raise AssertionError("cancel did not finish")

    await lab.sdk(cancel)
    assert (await lab.sdk(partial(get_disk, disk_id=disk.id))).status == types.DiskStatus.ILLEGAL


async def test_a_new_disk_is_locked_for_disk_seconds_whoever_polls(lab: Lab) -> None:
    """vdsm creates the volume while the disk is locked; the disk is ok after
    ``Faults.disk_seconds`` of the engine's clock, polled or not (the lab used to show it ok
    at its first GET, and never without one). A client that polls sees it locked until then,
    however often it looks, and cannot upload to it or attach it meanwhile."""
    a = lab.engine.activity
    lab.engine.faults.disk_seconds = 2 * lab.engine.faults.phase_seconds
    disk = await lab.sdk(add_disk)
    assert disk.status == types.DiskStatus.LOCKED

    def look(conn: Client) -> list[types.DiskStatus]:
        listed = conn.system_service().disks_service().list(search=f"id={disk.id}")
        return [get_disk(conn, disk.id).status for _ in range(5)] + [d.status for d in listed]

    assert await lab.sdk(look) == [types.DiskStatus.LOCKED] * 6
    e = await lab.sdk(fault(partial(upload, disk_id=disk.id)))
    assert e.code == 409 and "is locked" in str(e)
    e = await lab.sdk(fault(partial(remove_disk, disk_id=disk.id)))
    assert e.code == 409 and "is locked" in str(e)  # as the engine: not while vdsm creates it
    await lab.advance(1.5)  # three quarters of disk_seconds
    assert await lab.sdk(look) == [types.DiskStatus.LOCKED] * 6
    assert a.inventory.disks[disk.id].status == "locked"
    await lab.advance(0.5)  # nobody polled
    assert a.inventory.disks[disk.id].status == "ok"
    assert [e.code for e in a.events[-2:]] == [2020, 2021]
    assert await lab.sdk(look) == [types.DiskStatus.OK] * 6
    transfer = await lab.sdk(partial(upload, disk_id=disk.id))
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))


async def test_disk_refusals(lab: Lab) -> None:
    e = await lab.sdk(fault(partial(add_disk, format=None)))
    assert e.code == 400
    e = await lab.sdk(fault(partial(add_disk, storage_domains=[types.StorageDomain(name="x")])))
    assert e.code == 404
    e = await lab.sdk(
        fault(partial(add_disk, format=types.DiskFormat.RAW, backup=types.DiskBackup.INCREMENTAL))
    )
    assert e.code == 400
    assert "INCREMENTAL_BACKUP_NOT_SUPPORTED_FOR_RAW_DISK" in str(e)
    disk = await lab.sdk(partial(add_disk, storage_domains=[types.StorageDomain(id=SD_ID)]))
    e = await lab.sdk(fault(partial(add_disk, id=disk.id)))
    assert e.code == 409


async def test_vm_from_ovf_attach_and_delete(lab: Lab) -> None:
    ovf = await lab.sdk(vm_config)
    e = await lab.sdk(fault(partial(add_vm, body=ovf_vm("copy", ovf, regenerate=False))))
    assert e.code == 409  # the OVF's VM id exists
    e = await lab.sdk(fault(partial(add_vm, body=ovf_vm("vm1", ovf))))
    assert e.code == 409  # name in use
    vm = await lab.sdk(partial(add_vm, body=ovf_vm("copy", ovf)))
    original = lab.engine.inventory.vms[VM_ID]
    assert vm.id != VM_ID
    assert vm.status == types.VmStatus.DOWN
    assert vm.memory == original.memory
    assert (vm.cpu.topology.sockets, vm.cpu.topology.cores) == (original.sockets, original.cores)
    assert vm.os.type == original.os_type
    assert lab.engine.inventory.vms[vm.id].nics == original.nics

    disk = await lab.sdk(add_disk)
    e = await lab.sdk(fault(partial(attach, vm_id=vm.id, disk_id=disk.id)))
    assert e.code == 409  # still locked: the engine is creating it
    await lab.sdk(partial(disk_ok, disk_id=disk.id))
    e = await lab.sdk(fault(partial(attach, vm_id=vm.id, disk_id=disk.id, bootable=None)))
    assert e.code == 400
    att = await lab.sdk(partial(attach, vm_id=vm.id, disk_id=disk.id))
    assert att.interface == types.DiskInterface.VIRTIO
    assert att.bootable is True
    listed = await lab.sdk(
        lambda c: (
            c.system_service().vms_service().vm_service(vm.id).disk_attachments_service().list()
        )
    )
    assert [a.id for a in listed] == [disk.id]
    e = await lab.sdk(fault(partial(attach, vm_id=VM_ID, disk_id=disk.id)))
    assert e.code == 409  # attached elsewhere
    e = await lab.sdk(
        fault(lambda c: c.system_service().disks_service().disk_service(disk.id).remove())
    )
    assert e.code == 409  # attached

    await lab.sdk(
        lambda c: c.system_service().vms_service().vm_service(vm.id).remove(detach_only=True)
    )
    assert vm.id not in lab.engine.inventory.vms
    assert disk.id in lab.engine.inventory.disks
    e = await lab.sdk(fault(lambda c: c.system_service().vms_service().vm_service(VM_ID).remove()))
    assert e.code == 409  # running

    again = await lab.sdk(partial(add_vm, body=ovf_vm("copy", ovf)))
    await lab.sdk(partial(attach, vm_id=again.id, disk_id=disk.id))
    image = lab.engine.activity.images[disk.id]
    await lab.sdk(lambda c: c.system_service().vms_service().vm_service(again.id).remove())
    assert disk.id not in lab.engine.inventory.disks
    assert not image.exists()


async def test_vm_from_plain_fields(lab: Lab) -> None:
    body = types.Vm(name="plain", cluster=types.Cluster(name="Default"), memory=512 * MiB)
    e = await lab.sdk(fault(partial(add_vm, body=body)))
    assert e.code == 400  # no template and no OVF
    body.template = types.Template(name="Blank")
    body.cpu = types.Cpu(topology=types.CpuTopology(sockets=2, cores=3, threads=1))
    vm = await lab.sdk(partial(add_vm, body=body))
    assert (vm.name, vm.memory, vm.cpu.topology.sockets, vm.cpu.topology.cores) == (
        "plain",
        512 * MiB,
        2,
        3,
    )
    body.name = "other"
    body.cluster = types.Cluster(name="nosuch")
    e = await lab.sdk(fault(partial(add_vm, body=body)))
    assert e.code == 404


async def test_the_plugin_deletes_a_disk_still_locked_once_it_is_ok(
    lab: Lab, tmp_path: Path
) -> None:
    """A failed restore deletes the disk it has just created, which the engine still shows
    locked: ``disks.delete_disk`` waits on its client's clock (here the lab's: each pause
    steps it) until the disk is ok, then deletes it."""
    lab.engine.faults.disk_seconds = 4 * lab.engine.faults.phase_seconds
    clock = lab.engine.clock
    assert isinstance(clock, FakeClock)
    disk = await lab.sdk(add_disk)
    before = clock.now()
    password = tmp_path / "password"
    password.write_text(lab.engine.password + "\n")
    config = EngineConfig(lab.engine.url, lab.engine.username, password, lab.engine.ca_file)

    class LabClock:
        def monotonic(self) -> float:
            return clock.now()

        async def sleep(self, seconds: float) -> None:
            await clock.advance(seconds)

    async with EngineClient(config, clock=LabClock()) as client:
        assert await delete_disk(client, disk.id) is True
        assert clock.now() - before >= lab.engine.faults.disk_seconds  # it waited, not failed
        assert disk.id not in lab.engine.activity.inventory.disks
        assert await delete_disk(client, disk.id) is False  # gone: done


def domain_in_dc(conn: sdk.Connection, dc_id: str, sd_id: str) -> types.StorageDomain:
    dcs = conn.system_service().data_centers_service()
    return (
        dcs.data_center_service(dc_id).storage_domains_service().storage_domain_service(sd_id).get()
    )


def domain(conn: sdk.Connection, sd_id: str) -> types.StorageDomain:
    return conn.system_service().storage_domains_service().storage_domain_service(sd_id).get()


async def test_a_domain_has_a_status_in_its_data_center_and_only_there(lab: Lab) -> None:
    inv = lab.engine.inventory
    sd = inv.storage_domains[SD_ID]
    top = await lab.sdk(partial(domain, sd_id=SD_ID))
    assert top.status is None  # the engine: an attached domain's status is the pool's
    assert [d.id for d in top.data_centers] == [sd.data_center_id]
    inner = await lab.sdk(partial(domain_in_dc, dc_id=sd.data_center_id, sd_id=SD_ID))
    assert inner.status == types.StorageDomainStatus.ACTIVE
    inv.storage_domains[SD_ID] = replace(sd, status="maintenance")
    inner = await lab.sdk(partial(domain_in_dc, dc_id=sd.data_center_id, sd_id=SD_ID))
    assert inner.status == types.StorageDomainStatus.MAINTENANCE
    e = await lab.sdk(fault(add_disk))
    assert e.code == 409
    assert "Storage Domain's status is Maintenance" in str(e)
    assert lab.engine.activity.images_dir is None or not any(
        lab.engine.activity.images_dir.glob("*")
    )


async def test_new_disks_take_the_domains_space_and_give_it_back(lab: Lab) -> None:
    inv = lab.engine.inventory
    before = inv.storage_domains[SD_ID]
    thin = await lab.sdk(add_disk)
    assert inv.storage_domains[SD_ID].available == before.available  # a thin file grows later
    full = await lab.sdk(partial(add_disk, sparse=False, format=types.DiskFormat.RAW))
    after = await lab.sdk(partial(domain, sd_id=SD_ID))
    assert after.available == before.available - 2 * MiB
    assert after.used == before.used + 2 * MiB
    inv.storage_domains[SD_ID] = replace(inv.storage_domains[SD_ID], available=MiB)
    e = await lab.sdk(fault(partial(add_disk, sparse=False, format=types.DiskFormat.RAW)))
    assert e.code == 409
    assert "Low disk space on Storage Domain data1" in str(e)
    await lab.sdk(partial(disk_ok, disk_id=full.id))
    await lab.sdk(partial(remove_disk, disk_id=full.id))
    assert inv.storage_domains[SD_ID].available == 3 * MiB
    await lab.sdk(partial(disk_ok, disk_id=thin.id))
    await lab.sdk(partial(remove_disk, disk_id=thin.id))
    assert inv.storage_domains[SD_ID].available == 3 * MiB
