"""Disk attachments to the lab's DataMover VM, driven by the real ovirtsdk4 (API-NOTES § 7
steps 7–10, § 8.5): a snapshot's disk attached transient shows up as a local device (nbdfuse
over qemu-nbd) under the lab's by-id directory with the snapshot's guest data, writes to it
never reach the snapshot; a plain disk's device is writable and its writes persist; detach
removes the device; the engine's refusals and events."""

import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from engine.core.units import KiB, MiB
from engine.io import qemu
from plugins.lab.engine import DiskSeed, FakeClock, FakeEngine, Seed, VmSeed, lab_id
from plugins.lab.engine.devices import link_name, mounts_under
from tests.lab.polling import Client, steps
from tests.lab.test_fake_engine_backup import Lab, raw_copy, run, write
from tests.lab.test_fake_engine_restore import add_disk, disk_ok
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

SIZE = 8 * MiB
VM_ID = lab_id("vm", "vm1")
DM_ID = lab_id("vm", "dm")
QCOW_ID = lab_id("disk", "vm1_os")
RAW_ID = lab_id("disk", "vm1_raw")


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    before = leaks.children()
    qcow, raw = tmp_path / "os.qcow2", tmp_path / "data.raw"
    await run("qemu-img", "create", "-q", "-f", "qcow2", qcow, SIZE)
    await write(qcow, "qcow2", 0xAA, 0, MiB)
    await run("qemu-img", "create", "-q", "-f", "raw", raw, MiB)
    await write(raw, "raw", 0x11, 128 * KiB, 64 * KiB)
    seed = Seed(
        vms=(
            VmSeed(
                "vm1",
                disks=(DiskSeed("vm1_os", SIZE), DiskSeed("vm1_raw", MiB, "raw", backup="none")),
            ),
            VmSeed("dm", disks=(DiskSeed("dm_os", MiB),)),
        )
    )
    workdir = tmp_path / "engine"
    workdir.mkdir()
    async with FakeEngine(
        seed,
        workdir,
        clock=FakeClock(),
        images={QCOW_ID: qcow, RAW_ID: raw},
        datamover="dm",
        devices_dir=tmp_path / "devices",
    ) as engine:
        yield Lab(engine, None, qcow, raw, tmp_path)
    assert not mounts_under(tmp_path)
    assert leaks.children() <= before


def snapshot(conn: Client) -> str:
    service = conn.system_service().vms_service().vm_service(VM_ID).snapshots_service()
    s = service.add(types.Snapshot(description="attach test", persist_memorystate=False))
    for _ in steps(conn):
        if service.snapshot_service(s.id).get().snapshot_status == types.SnapshotStatus.OK:
            return str(s.id)
    raise AssertionError("snapshot stuck")


def attach(
    conn: sdk.Connection,
    disk_id: str,
    snapshot_id: str | None = None,
    interface: types.DiskInterface | None = types.DiskInterface.VIRTIO_SCSI,
) -> types.DiskAttachment:
    snap = types.Snapshot(id=snapshot_id) if snapshot_id else None
    service = conn.system_service().vms_service().vm_service(DM_ID).disk_attachments_service()
    return service.add(
        types.DiskAttachment(
            disk=types.Disk(id=disk_id, snapshot=snap),
            active=True,
            bootable=False,
            interface=interface,
        )
    )


def detach(conn: sdk.Connection, disk_id: str) -> None:
    service = conn.system_service().vms_service().vm_service(DM_ID).disk_attachments_service()
    service.attachment_service(disk_id).remove(detach_only=True)


def remove_snapshot(conn: sdk.Connection, snapshot_id: str) -> None:
    vm = conn.system_service().vms_service().vm_service(VM_ID)
    vm.snapshots_service().snapshot_service(snapshot_id).remove()


def codes(conn: sdk.Connection) -> list[int]:
    return [e.code for e in conn.system_service().events_service().list()]


async def refused(lab: Lab, status: int, fn: object, *args: object) -> str:
    """Run ``fn(conn, *args)`` expecting an SDK error with ``status``; return its text."""

    def call(conn: sdk.Connection) -> tuple[int | None, str]:
        try:
            fn(conn, *args)  # type: ignore[operator]
        except sdk.Error as e:
            return getattr(e, "code", None), str(e)
        raise AssertionError(f"{fn} succeeded")

    code, text = await lab.sdk(call)
    assert code == status, text
    return str(text)


async def test_snapshot_disk_is_a_transient_device(lab: Lab) -> None:
    s_id = await lab.sdk(snapshot)
    expected = await raw_copy(lab.qcow, lab.tmp)  # the guest data at snapshot time
    await write(lab.qcow, "qcow2", 0xCC, 0, 64 * KiB)  # the VM writes after the snapshot
    att = await lab.sdk(partial(attach, disk_id=QCOW_ID, snapshot_id=s_id))
    assert att.disk.id == QCOW_ID and att.disk.snapshot.id == s_id and att.active
    by_id = lab.tmp / "devices" / "by-id"
    device = by_id / link_name(QCOW_ID, "virtio_scsi")
    assert device.name == f"scsi-0QEMU_QEMU_HARDDISK_{QCOW_ID[:20]}"
    assert device.read_bytes() == expected
    with open(device, "r+b") as f:  # transient: the DataMover may write, the snapshot stays
        f.write(b"\xee" * 4096)
        f.flush()
        os.fsync(f.fileno())
    assert device.read_bytes()[:4096] == b"\xee" * 4096

    text = await refused(lab, 409, remove_snapshot, s_id)
    assert "attached to VM dm" in text
    listed = await lab.sdk(
        lambda c: (
            c.system_service().vms_service().vm_service(DM_ID).disk_attachments_service().list()
        )
    )
    assert {a.disk.id for a in listed} == {lab_id("disk", "dm_os"), QCOW_ID}

    await lab.sdk(partial(detach, disk_id=QCOW_ID))
    assert not device.exists() and not list(by_id.iterdir())
    assert not mounts_under(lab.tmp / "devices")
    await lab.sdk(partial(remove_snapshot, snapshot_id=s_id))
    current = await raw_copy(lab.qcow, lab.tmp)
    assert current[: 64 * KiB] == b"\xcc" * (64 * KiB)  # the VM's write, merged back
    assert current[64 * KiB :] == expected[64 * KiB :]  # nothing of the DataMover's write
    events = await lab.sdk(codes)
    assert 2016 in events and 2018 in events


async def test_plain_disk_device_persists_writes(lab: Lab) -> None:
    def new_disk(conn: Client) -> str:
        d = add_disk(conn, alias="seed")
        disk_ok(conn, d.id)  # locked while the engine creates it
        return str(d.id)

    disk_id = await lab.sdk(new_disk)
    await lab.sdk(partial(attach, disk_id=disk_id, interface=types.DiskInterface.VIRTIO))
    device = lab.tmp / "devices" / "by-id" / f"virtio-{disk_id[:20]}"
    assert device.stat().st_size == 2 * MiB
    with open(device, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x5a" * 8192)
        os.fsync(f.fileno())
    await lab.sdk(partial(detach, disk_id=disk_id))
    assert not device.exists()
    data = await raw_copy(lab.engine.activity.images[disk_id], lab.tmp)
    assert data[MiB : MiB + 8192] == b"\x5a" * 8192
    assert data[:MiB] == bytes(MiB)


async def test_a_punched_hole_in_a_plain_disk_device_reads_as_zeroes(lab: Lab) -> None:
    """As on a real disk (a hole punched in a SCSI disk is WRITE SAME with UNMAP), also for
    part of a qcow2 cluster, which a bare nbdfuse would send as a trim qemu-nbd drops."""

    def new_disk(conn: Client) -> str:
        d = add_disk(conn, alias="punched")
        disk_ok(conn, d.id)
        return str(d.id)

    disk_id = await lab.sdk(new_disk)
    info = await qemu.info(lab.engine.activity.images[disk_id])
    assert (info["format"], info["cluster-size"]) == ("qcow2", 64 * KiB)  # the hole: part of one
    await lab.sdk(partial(attach, disk_id=disk_id))
    device = lab.tmp / "devices" / "by-id" / link_name(disk_id, "virtio_scsi")
    data = os.urandom(64 * KiB)
    with open(device, "r+b") as f:
        f.seek(MiB)
        f.write(data)
        os.fsync(f.fileno())
    # util-linux fallocate: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE on the device file
    await run("fallocate", "--punch-hole", "--offset", MiB + 4096, "--length", 8192, device)
    expected = data[:4096] + bytes(8192) + data[12288:]
    with open(device, "rb") as f:
        f.seek(MiB)
        assert f.read(64 * KiB) == expected
    await lab.sdk(partial(detach, disk_id=disk_id))
    image = await raw_copy(lab.engine.activity.images[disk_id], lab.tmp)
    assert image[MiB : MiB + 64 * KiB] == expected
    assert image[:MiB] == bytes(MiB)


async def test_refusals(lab: Lab) -> None:
    s_id = await lab.sdk(snapshot)
    unknown = lab_id("snapshot", "nope")
    assert "does not exist" in await refused(lab, 409, attach, QCOW_ID, unknown)
    assert "disk" in await refused(lab, 404, attach, lab_id("disk", "nope"), s_id)
    dm_disk = lab_id("disk", "dm_os")
    assert "not part of snapshot" in await refused(lab, 409, attach, dm_disk, s_id)
    assert "required" in await refused(lab, 400, attach, QCOW_ID, s_id, None)
    await lab.sdk(partial(attach, disk_id=RAW_ID, snapshot_id=s_id))
    assert "attached to VM dm" in await refused(lab, 409, attach, RAW_ID, s_id)
    assert "disk attachment" in await refused(lab, 404, detach, QCOW_ID)
    await lab.sdk(partial(detach, disk_id=RAW_ID))
    await lab.sdk(partial(remove_snapshot, snapshot_id=s_id))
    assert not lab.engine.devices or not lab.engine.devices.plugged
