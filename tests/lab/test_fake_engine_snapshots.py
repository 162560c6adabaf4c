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
from plugins.lab.engine.records import SNAPSHOT_CREATED, SNAPSHOT_REMOVED
from plugins.ovirt.imageio import ImageioDisk
from tests.lab import test_fake_engine_backup as base
from tests.lab.polling import Client, steps
from tests.lab.test_fake_engine_backup import (
    DOWN_VM_ID,
    QCOW_ID,
    RAW_ID,
    VM_ID,
    Lab,
    fault,
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


def create_snapshot(conn: Client) -> types.Snapshot:
    s = snapshots_service(conn).add(
        types.Snapshot(description="lab snapshot", persist_memorystate=False)
    )
    assert s.snapshot_status == types.SnapshotStatus.LOCKED
    service = snapshots_service(conn).snapshot_service(s.id)
    for _ in steps(conn):
        s = service.get()
        if s.snapshot_status == types.SnapshotStatus.OK:
            return s
    raise AssertionError(f"snapshot stuck in {s.snapshot_status}")


def snapshot_transfer(conn: Client, volume_id: str) -> types.ImageTransfer:
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(
        types.ImageTransfer(
            snapshot=types.DiskSnapshot(id=volume_id),
            direction=types.ImageTransferDirection.DOWNLOAD,
            format=types.DiskFormat.RAW,
        )
    )
    service = transfers.image_transfer_service(transfer.id)
    for _ in steps(conn):
        transfer = service.get()
        if transfer.phase == types.ImageTransferPhase.TRANSFERRING:
            return transfer
    raise AssertionError(f"transfer stuck in {transfer.phase}")


def remove_snapshot(conn: Client, snapshot_id: str) -> int:
    """DELETE, then poll until 404, stepping the clock between GETs; returns how many GETs
    still saw it."""
    service = snapshots_service(conn).snapshot_service(snapshot_id)
    service.remove()
    for seen in steps(conn):
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

    assert await lab.sdk(partial(remove_snapshot, snapshot_id=s.id)) == 1  # one phase step
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


async def dirty_extents(lab: Lab, backup_id: str) -> list[tuple[int, int]]:
    """The dirty ranges of the qcow2 disk's transfer of incremental backup ``backup_id``,
    each checked against the guest's view of the active layer."""
    transfer = await lab.sdk(lambda c: base.create_transfer(c, backup_id, QCOW_ID))
    expected = await raw_copy(lab.qcow, lab.tmp)
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as disk:
        dirty = [(e.start, e.length) for e in await disk.extents("dirty", 0, base.SIZE) if e.dirty]
        reader = await disk.open_reader()
        try:
            for offset, length in dirty:
                buf = bytearray(length)
                await reader.readinto(offset, memoryview(buf))
                assert buf == expected[offset : offset + length], offset
        finally:
            await reader.close()
    await lab.sdk(lambda c: finalize_transfer(c, transfer.id))
    return dirty


async def test_backups_across_snapshots_read_the_active_layer_and_only_changes(
    lab: Lab,
) -> None:
    """As the engine backs up a VM with user snapshots: a full backup reads the active layer
    (through the chain), and an incremental from a checkpoint older than the snapshots reads
    exactly the blocks written since, before and after each snapshot (the bitmaps are copied
    into every new top layer). Removing the snapshots, middle one first, keeps the content
    and every checkpoint's change set."""
    first = await lab.sdk(start_backup)
    c1 = first.to_checkpoint_id
    await lab.sdk(lambda c: stop_backup(c, first.id))
    x, y, z = (MiB + 64 * KiB, 64 * KiB), (6 * MiB, 128 * KiB), (2 * MiB, 64 * KiB)
    await write(lab.qcow, "qcow2", 0xCC, *x)  # before the snapshots
    s1 = await lab.sdk(create_snapshot)
    await write(lab.qcow, "qcow2", 0xDD, *y)  # between them
    await write(lab.raw, "qcow2", 0x22, 0, 64 * KiB)  # the raw disk's overlay
    s2 = await lab.sdk(create_snapshot)
    await write(lab.qcow, "qcow2", 0xEE, *z)  # after both

    full = await lab.sdk(start_backup)
    for disk_id, image in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw)):
        transfer = await lab.sdk(lambda c, d=disk_id: base.create_transfer(c, full.id, d))
        expected = await raw_copy(image, lab.tmp)
        assert await read_all(transfer.transfer_url, len(expected), lab.ca) == expected
        await lab.sdk(lambda c, t=transfer.id: finalize_transfer(c, t))
    await lab.sdk(lambda c: stop_backup(c, full.id))

    inc = await lab.sdk(lambda c: start_backup(c, c1))
    modes = await lab.sdk(lambda c: base.backup_modes(c, inc.id))
    assert modes[QCOW_ID] == "incremental"
    assert await dirty_extents(lab, inc.id) == sorted([x, y, z])
    await lab.sdk(lambda c: stop_backup(c, inc.id))

    w = (4 * MiB, 64 * KiB)
    await write(lab.qcow, "qcow2", 0x77, *w)  # after the last checkpoint only
    inc2 = await lab.sdk(lambda c: start_backup(c, inc.to_checkpoint_id))
    assert await dirty_extents(lab, inc2.id) == [w]
    await lab.sdk(lambda c: stop_backup(c, inc2.id))

    before = {d: await raw_copy(p, lab.tmp) for d, p in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw))}
    for s in (s1, s2):  # the middle one first: its child is the next snapshot's volume
        await lab.sdk(partial(remove_snapshot, snapshot_id=s.id))
    for disk_id, image in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw)):
        assert await raw_copy(image, lab.tmp) == before[disk_id]
    assert (await qemu.info(lab.qcow)).get("backing-filename") is None
    assert (await qemu.info(lab.raw))["format"] == "raw"
    assert not list(lab.tmp.glob(f"*.{s1.id}")) and not list(lab.tmp.glob(f"*.{s2.id}"))
    checkpoints = {c1, full.to_checkpoint_id, inc.to_checkpoint_id, inc2.to_checkpoint_id}
    assert set(await qemu.bitmaps(lab.qcow)) == checkpoints
    inc3 = await lab.sdk(lambda c: start_backup(c, inc.to_checkpoint_id))
    assert await dirty_extents(lab, inc3.id) == [w]  # made after s2: kept by the merge
    await lab.sdk(lambda c: stop_backup(c, inc3.id))


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

    def remove_active(conn: sdk.Connection) -> int:
        svc = snapshots_service(conn)
        return fails(lambda: svc.snapshot_service(svc.list()[0].id).remove())

    def snapshot_during_backup(conn: sdk.Connection) -> int:
        return fails(lambda: snapshots_service(conn).add(types.Snapshot(description="second")))

    assert await lab.sdk(remove_active) == 409
    backup = await lab.sdk(start_backup)  # a VM with a snapshot is backed up, as the engine
    assert await lab.sdk(snapshot_during_backup) == 409
    await lab.sdk(lambda c: stop_backup(c, backup.id))
    disks = await lab.sdk(
        lambda c: snapshots_service(c).snapshot_service(s.id).disks_service().list()
    )
    transfer = await lab.sdk(partial(snapshot_transfer, volume_id=disks[0].image_id))

    def remove_while_transferring(conn: sdk.Connection) -> int:
        return fails(lambda: snapshots_service(conn).snapshot_service(s.id).remove())

    assert await lab.sdk(remove_while_transferring) == 409
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    await lab.sdk(partial(remove_snapshot, snapshot_id=s.id))


async def test_snapshot_phases_move_with_nobody_polling(lab: Lab) -> None:
    """The engine's snapshot commands finish in its own threads: a new snapshot becomes ok,
    and a removed one goes, one phase step later, with no client sending a GET (the lab used
    to move them one step per GET, so an unpolled snapshot stayed locked for ever). Without
    that step it stays locked, however often a client looks."""
    a = lab.engine.activity
    made = await lab.sdk(lambda c: snapshots_service(c).add(types.Snapshot(description="unpolled")))
    assert made.snapshot_status == types.SnapshotStatus.LOCKED

    def statuses(conn: Client) -> list[types.SnapshotStatus]:
        service = snapshots_service(conn).snapshot_service(made.id)
        return [service.get().snapshot_status for _ in range(5)]

    assert await lab.sdk(statuses) == [types.SnapshotStatus.LOCKED] * 5
    await lab.advance(0.5)
    assert a.snapshots[made.id].status == "locked"  # half a step: not yet
    await lab.advance(0.5)
    assert a.snapshots[made.id].status == "ok"
    assert a.events[-1].code == SNAPSHOT_CREATED

    await lab.sdk(lambda c: snapshots_service(c).snapshot_service(made.id).remove())
    assert a.snapshots[made.id].status == "locked"
    await lab.advance()
    assert made.id not in a.snapshots
    assert a.events[-1].code == SNAPSHOT_REMOVED
    seen = await lab.sdk(lambda c: [s.id for s in snapshots_service(c).list()])
    assert made.id not in seen


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

    def again(conn: Client) -> list[tuple[int, str]]:
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
        for _ in steps(conn):  # the removal ends on its own a phase step later
            try:
                snapshot.get()
            except sdk.NotFoundError:
                break
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


async def test_a_snapshots_disks_are_locked_while_it_is_made_and_merged(lab: Lab) -> None:
    """The engine locks the images of a snapshot's disks while it creates the snapshot and
    while it merges it away: the disks show ``locked`` and another snapshot of them is
    refused meanwhile; they are ``ok`` again once the snapshot is ``ok`` or gone."""
    made = await lab.sdk(lambda c: snapshots_service(c).add(types.Snapshot(description="locks")))

    def disk_status(conn: Client) -> types.DiskStatus:
        return conn.system_service().disks_service().disk_service(QCOW_ID).get().status

    assert await lab.sdk(disk_status) == types.DiskStatus.LOCKED
    e = await lab.sdk(
        fault(lambda c: snapshots_service(c).add(types.Snapshot(description="second")))
    )
    assert e.code == 409 and "locked" in str(e).lower()
    await lab.advance()
    assert await lab.sdk(disk_status) == types.DiskStatus.OK

    await lab.sdk(lambda c: snapshots_service(c).snapshot_service(made.id).remove())
    assert await lab.sdk(disk_status) == types.DiskStatus.LOCKED
    await lab.advance()
    assert await lab.sdk(disk_status) == types.DiskStatus.OK
