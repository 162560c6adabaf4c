"""The fake engine's OVF and VM snapshots, driven by the real ovirtsdk4 (API-NOTES § 3, § 7).

Same lab as ``test_fake_engine_backup``: real qcow2/raw images, qemu-nbd, ovirt-imageio.
A snapshot is a qcow2 overlay at the image's path; its volume (the old top) is downloaded
through an image transfer; deleting it commits the overlay back.
"""

from functools import partial

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from engine.core.units import KiB, MiB
from engine.io import qemu
from tests.lab import test_fake_engine_backup as base
from tests.lab.polling import polls
from tests.lab.test_fake_engine_backup import (
    DOWN_VM_ID,
    POLLS,
    QCOW_ID,
    RAW_ID,
    VM_ID,
    Lab,
    finalize_transfer,
    raw_copy,
    read_all,
    start_backup,
    stop_backup,
    write,
)

pytestmark = pytest.mark.integration
lab = base.lab  # the fixtures, shared
nothing_left_behind = base.nothing_left_behind


def snapshots_service(conn: sdk.Connection) -> sdk.services.SnapshotsService:
    return conn.system_service().vms_service().vm_service(VM_ID).snapshots_service()


def create_snapshot(conn: sdk.Connection) -> types.Snapshot:
    s = snapshots_service(conn).add(
        types.Snapshot(description="lab snapshot", persist_memorystate=False)
    )
    assert s.snapshot_status == types.SnapshotStatus.LOCKED
    service = snapshots_service(conn).snapshot_service(s.id)
    for _ in polls():
        s = service.get()
        if s.snapshot_status == types.SnapshotStatus.OK:
            return s
    raise AssertionError(f"snapshot stuck in {s.snapshot_status}")


def snapshot_transfer(conn: sdk.Connection, volume_id: str) -> types.ImageTransfer:
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(
        types.ImageTransfer(
            snapshot=types.DiskSnapshot(id=volume_id),
            direction=types.ImageTransferDirection.DOWNLOAD,
            format=types.DiskFormat.RAW,
        )
    )
    service = transfers.image_transfer_service(transfer.id)
    for _ in polls():
        transfer = service.get()
        if transfer.phase == types.ImageTransferPhase.TRANSFERRING:
            return transfer
    raise AssertionError(f"transfer stuck in {transfer.phase}")


def remove_snapshot(conn: sdk.Connection, snapshot_id: str) -> int:
    """DELETE, then poll until 404; returns how many GETs still saw it."""
    service = snapshots_service(conn).snapshot_service(snapshot_id)
    service.remove()
    for seen in range(POLLS):
        try:
            assert service.get().snapshot_status == types.SnapshotStatus.LOCKED
        except sdk.NotFoundError:
            return seen
    raise AssertionError("snapshot never went away")


async def test_ovf_only_with_all_content_and_agent_facts(lab: Lab) -> None:
    def get(conn: sdk.Connection, vm_id: str, content: bool) -> types.Vm:
        return conn.system_service().vms_service().vm_service(vm_id).get(all_content=content)

    plain = await lab.sdk(partial(get, vm_id=VM_ID, content=False))
    assert plain.initialization is None
    full = await lab.sdk(partial(get, vm_id=VM_ID, content=True))
    config = full.initialization.configuration
    assert config.type == types.ConfigurationType.OVF
    assert config.data.startswith("<?xml") and "<ovf:Envelope" in config.data
    for needle in ("<Name>vm1</Name>", QCOW_ID, RAW_ID, "nic1", "<rasd:num_of_sockets>1<"):
        assert needle in config.data, needle
    listed = await lab.sdk(
        lambda c: c.system_service().vms_service().list(search="name=vm1", all_content=True)
    )
    assert listed[0].initialization.configuration.data == config.data
    # A running VM with an agent reports a guest OS; a down VM reports none.
    assert full.guest_operating_system is not None and full.fqdn
    down = await lab.sdk(partial(get, vm_id=DOWN_VM_ID, content=False))
    assert down.guest_operating_system is None and down.fqdn is None


async def test_snapshot_reads_snapshot_time_content_and_delete_keeps_data(lab: Lab) -> None:
    backup = await lab.sdk(start_backup)  # a checkpoint bitmap that must survive the snapshot
    await lab.sdk(lambda c: stop_backup(c, backup.id))
    checkpoint = backup.to_checkpoint_id
    at_snapshot = {
        d: await raw_copy(p, lab.tmp) for d, p in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw))
    }

    s = await lab.sdk(create_snapshot)
    listed = await lab.sdk(lambda c: snapshots_service(c).list())
    assert [x.snapshot_type for x in listed] == [
        types.SnapshotType.ACTIVE,
        types.SnapshotType.REGULAR,
    ]
    with_ovf = await lab.sdk(
        lambda c: snapshots_service(c).snapshot_service(s.id).get(query={"all_content": "true"})
    )
    assert "<Name>vm1</Name>" in with_ovf.initialization.configuration.data
    disks = await lab.sdk(
        lambda c: snapshots_service(c).snapshot_service(s.id).disks_service().list()
    )
    volumes = {d.id: d.image_id for d in disks}
    assert {d.id: d.format for d in disks} == {
        QCOW_ID: types.DiskFormat.COW,
        RAW_ID: types.DiskFormat.RAW,
    }
    assert await qemu.bitmaps(lab.qcow) == [checkpoint]  # the overlay tracks changes too

    # The guest writes to its active layer (now a qcow2 overlay for both disks).
    await write(lab.qcow, "qcow2", 0xCC, MiB, 64 * KiB)
    await write(lab.raw, "qcow2", 0xDD, 0, 64 * KiB)
    after_write = {
        d: await raw_copy(p, lab.tmp) for d, p in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw))
    }
    assert after_write != at_snapshot
    for disk_id, volume in volumes.items():
        transfer = await lab.sdk(partial(snapshot_transfer, volume_id=volume))
        expected = at_snapshot[disk_id]
        assert await read_all(transfer.transfer_url, len(expected), lab.ca) == expected
        await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))

    assert await lab.sdk(partial(remove_snapshot, snapshot_id=s.id)) >= 1  # async delete
    listed = await lab.sdk(lambda c: snapshots_service(c).list())
    assert [x.snapshot_type for x in listed] == [types.SnapshotType.ACTIVE]
    assert (await qemu.info(lab.raw))["format"] == "raw"
    assert (await qemu.info(lab.qcow)).get("backing-filename") is None
    for disk_id, image in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw)):
        assert await raw_copy(image, lab.tmp) == after_write[disk_id]
    assert await qemu.bitmaps(lab.qcow) == [checkpoint]
    assert not list(lab.tmp.glob(f"*.{s.id}"))  # no volume file left

    # The checkpoint saw the write made while the snapshot existed.
    inc = await lab.sdk(lambda c: start_backup(c, checkpoint))
    modes = await lab.sdk(
        lambda c: {
            d.id: d.backup_mode
            for d in c.system_service()
            .vms_service()
            .vm_service(VM_ID)
            .backups_service()
            .backup_service(inc.id)
            .disks_service()
            .list()
        }
    )
    assert modes[QCOW_ID] == types.DiskBackupMode.INCREMENTAL
    await lab.sdk(lambda c: stop_backup(c, inc.id))


async def test_snapshot_refusals(lab: Lab) -> None:
    def fails(fn: object) -> int:
        assert callable(fn)
        with pytest.raises(sdk.Error) as info:
            fn()
        return int(info.value.code or 0)

    def no_description(conn: sdk.Connection) -> int:
        return fails(lambda: snapshots_service(conn).add(types.Snapshot()))

    assert await lab.sdk(no_description) == 400
    s = await lab.sdk(create_snapshot)

    def refusals(conn: sdk.Connection) -> list[int]:
        svc = snapshots_service(conn)
        active = svc.list()[0].id
        backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
        return [
            fails(lambda: svc.add(types.Snapshot(description="second"))),
            fails(lambda: svc.snapshot_service(active).remove()),
            fails(lambda: backups.add(types.Backup(disks=[types.Disk(id=QCOW_ID)]))),
        ]

    assert await lab.sdk(refusals) == [409, 409, 409]
    disks = await lab.sdk(
        lambda c: snapshots_service(c).snapshot_service(s.id).disks_service().list()
    )
    transfer = await lab.sdk(partial(snapshot_transfer, volume_id=disks[0].image_id))

    def remove_while_transferring(conn: sdk.Connection) -> int:
        return fails(lambda: snapshots_service(conn).snapshot_service(s.id).remove())

    assert await lab.sdk(remove_while_transferring) == 409
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    await lab.sdk(partial(remove_snapshot, snapshot_id=s.id))


async def test_repeated_cleanup_calls_are_refused_as_the_engine_does(lab: Lab) -> None:
    """What recovery meets after a kill: a finished transfer refuses finalize and cancel
    (409 ``Phase is finished_success``), a snapshot being removed refuses another DELETE
    (409 ``locked``) and is then gone (404): ``plugins.ovirt.idempotent`` reads these."""
    s = await lab.sdk(create_snapshot)
    disks = await lab.sdk(
        lambda c: snapshots_service(c).snapshot_service(s.id).disks_service().list()
    )
    transfer = await lab.sdk(partial(snapshot_transfer, volume_id=disks[0].image_id))
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))

    def again(conn: sdk.Connection) -> list[tuple[int, str]]:
        service = conn.system_service().image_transfers_service()
        snapshot = snapshots_service(conn).snapshot_service(s.id)
        answers = []
        calls = [
            service.image_transfer_service(transfer.id).finalize,
            service.image_transfer_service(transfer.id).cancel,
            snapshot.remove,
            snapshot.remove,  # once more while it is being removed
        ]
        for n, call in enumerate(calls):
            if n == 3:
                assert snapshot.get().snapshot_status == types.SnapshotStatus.LOCKED
            try:
                call()
            except sdk.Error as e:
                answers.append((int(e.code or 0), str(e.fault.detail if e.fault else e)))
            else:
                answers.append((200, ""))
        with pytest.raises(sdk.NotFoundError):
            snapshot.get()
        with pytest.raises(sdk.NotFoundError):
            snapshot.remove()
        return answers

    assert await lab.sdk(again) == [
        (409, "[Cannot finalize image transfer. Phase is finished_success.]"),
        (409, "[Cannot cancel image transfer. Phase is finished_success.]"),
        (200, ""),
        (409, "[Cannot remove Snapshot. Snapshot is locked.]"),
    ]
