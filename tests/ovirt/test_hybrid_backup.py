"""Hybrid (snapshot-based) backups, as an engine with cluster level 4.7 runs them
(API-NOTES § 4.1): the lab engine takes a snapshot "Auto-generated for Backup VM" at start,
serves the backup from it, and removes it at finalize (``finalizing`` one more phase step).

First the fake itself, with the real ovirtsdk4: the backup names its snapshot, reads the
disk as it was at the start while the VM writes, and leaves no snapshot and intact bitmaps.
Then Tessera: `tessera backup vm` full and incremental on that cluster, restores byte-exact,
and the engine is left without any snapshot, backup or transfer still open."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from engine.core.units import MiB
from engine.io import qemu
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.hybrid import DESCRIPTION
from plugins.lab.engine.records import SNAPSHOT_CREATED, SNAPSHOT_REMOVED
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import lab_id
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.imageio import ImageioDisk
from tests.integration.images import identical, qemu_io, reference
from tests.lab.polling import polls
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import SEED, tessera
from tests.ovirt.test_faults import assert_clean

pytestmark = pytest.mark.integration

HYBRID = SEED  # cluster level 4.7, the seed's default: hybrid by default, as the engine
VM_ID = lab_id("vm", "vm1")
OS_ID = lab_id("disk", "vm1_os")
DATA_ID = lab_id("disk", "vm1_data")


Lab = tuple[FakeEngine, Path, dict[str, Path]]


@pytest.fixture
async def lab(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    disks = {d.alias: d for d in FakeEngine(HYBRID, engine_dir).inventory.disks.values()}
    fmt = {a: "qcow2" if d.format == "cow" else "raw" for a, d in disks.items()}
    images = {a: tmp_path / f"{a}.{fmt[a]}" for a in disks}
    await build_once(
        tmp_path_factory,
        [
            DiskRequest(
                a,
                p,
                fmt[a],
                disks[a].provisioned_size,
                template=a.endswith("_os"),
                vm="vm1",
            )
            for a, p in images.items()
        ],
    )
    async with (
        ImageioDaemon(base_dir=tmp_path) as daemon,
        FakeEngine(
            HYBRID, engine_dir, images={disks[a].id: p for a, p in images.items()}, imageio=daemon
        ) as engine,
    ):
        (tmp_path / "engine-password").write_text(HYBRID.password + "\n")
        config = tmp_path / "config.yaml"
        config.write_text(
            "stores:\n"
            f"  - name: main\n    path: {tmp_path / 'store'}\n"
            "engines:\n"
            f"  - name: lab\n    url: {engine.url}\n    username: {HYBRID.username}\n"
            f"    password_file: {tmp_path / 'engine-password'}\n"
            f"    ca_file: {engine.ca_file}\n"
        )
        code, _, err = await tessera("store", "init", tmp_path / "store")
        assert code == 0, err
        yield engine, config, images


async def call(engine: FakeEngine, fn: Callable[[sdk.Connection], Any]) -> Any:
    def run() -> Any:
        conn = sdk.Connection(
            url=engine.url,
            username=HYBRID.username,
            password=HYBRID.password,
            ca_file=str(engine.ca_file),
        )
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


def vm_service(conn: sdk.Connection) -> Any:
    return conn.system_service().vms_service().vm_service(VM_ID)


def snapshot_names(conn: sdk.Connection) -> list[str]:
    return [
        str(s.description)
        for s in vm_service(conn).snapshots_service().list()
        if s.snapshot_type != types.SnapshotType.ACTIVE
    ]


def start(conn: sdk.Connection, legacy: bool = False) -> tuple[types.Backup, list[str]]:
    """Start a full backup of the OS disk, poll to READY; the phases seen on the way."""
    backups = vm_service(conn).backups_service()
    query = {"legacy": "true"} if legacy else None
    backup = backups.add(types.Backup(disks=[types.Disk(id=OS_ID)]), query=query)
    phases = [str(backup.phase.value)]
    for _ in polls():
        backup = backups.backup_service(backup.id).get()
        if str(backup.phase.value) != phases[-1]:  # phases move with time: each seen once
            phases.append(str(backup.phase.value))
        if backup.phase == types.BackupPhase.READY:
            return backup, phases
    raise AssertionError(f"backup stuck: {phases}")


def stop(conn: sdk.Connection, backup_id: str) -> list[str]:
    service = vm_service(conn).backups_service().backup_service(backup_id)
    service.finalize()
    phases = []
    for _ in polls():
        phase = str(service.get().phase.value)
        if not phases or phase != phases[-1]:  # phases move with time: each seen once
            phases.append(phase)
        if phases[-1] in ("succeeded", "failed"):
            return phases
    raise AssertionError(f"backup stuck: {phases}")


def transfer(conn: sdk.Connection, backup_id: str) -> types.ImageTransfer:
    service = conn.system_service().image_transfers_service()
    t = service.add(
        types.ImageTransfer(
            disk=types.Disk(id=OS_ID),
            backup=types.Backup(id=backup_id),
            direction=types.ImageTransferDirection.DOWNLOAD,
            format=types.DiskFormat.RAW,
        )
    )
    for _ in polls():
        t = service.image_transfer_service(t.id).get()
        if t.phase == types.ImageTransferPhase.TRANSFERRING:
            return t
    raise AssertionError(f"transfer stuck in {t.phase}")


def finish(conn: sdk.Connection, transfer_id: str) -> None:
    service = conn.system_service().image_transfers_service().image_transfer_service(transfer_id)
    service.finalize()
    for _ in polls():
        if service.get().phase == types.ImageTransferPhase.FINISHED_SUCCESS:
            return
    raise AssertionError("transfer did not finish")


async def read_disk(url: str, size: int, ca_file: Path) -> bytes:
    buf = bytearray(size)
    async with await ImageioDisk.connect(url, ca=EngineCa.from_file(ca_file)) as disk:
        reader = await disk.open_reader()
        try:
            for offset in range(0, size, 8 * MiB):
                await reader.readinto(offset, memoryview(buf)[offset : offset + 8 * MiB])
        finally:
            await reader.close()
    return bytes(buf)


async def test_the_fake_serves_a_point_in_time_snapshot_and_removes_it(
    tmp_path: Path, lab: Lab
) -> None:
    engine, _, images = lab
    before = reference(images["vm1_os"], tmp_path / "before.raw").read_bytes()

    backup, phases = await call(engine, start)
    assert phases == ["initializing", "starting", "ready"]
    assert backup.snapshot is not None and backup.snapshot.id
    assert await call(engine, snapshot_names) == [DESCRIPTION]
    checkpoint = backup.to_checkpoint_id
    assert checkpoint is not None

    qemu_io(images["vm1_os"], "write -P 0x5a 0 1M")  # the VM writes during the backup
    t = await call(engine, lambda c: transfer(c, backup.id))
    assert await read_disk(t.transfer_url, len(before), engine.ca_file) == before  # as at start
    await call(engine, lambda c: finish(c, t.id))

    phases = await call(engine, lambda c: stop(c, backup.id))
    assert phases == ["finalizing", "succeeded"]  # one more step while the snapshot goes
    assert await call(engine, snapshot_names) == []
    assert not engine.activity.snapshots
    codes = [e.code for e in engine.activity.events]
    assert codes.count(SNAPSHOT_CREATED) == codes.count(SNAPSHOT_REMOVED) == 1
    # Merged back: the VM keeps its write, the checkpoint's bitmap tracks it.
    assert reference(images["vm1_os"], tmp_path / "after.raw").read_bytes()[:MiB] == b"\x5a" * MiB
    assert await qemu.bitmaps(images["vm1_os"], force_share=True) == [checkpoint]

    legacy, _ = await call(engine, lambda c: start(c, legacy=True))  # ?legacy=true: live
    assert legacy.snapshot is None and await call(engine, snapshot_names) == []
    await call(engine, lambda c: stop(c, legacy.id))


async def test_tessera_backs_up_incrementally_and_leaves_no_snapshot(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    refs = [{a: reference(p, tmp_path / f"t0-{a}.raw") for a, p in images.items()}]
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", "full")
    assert code == 0, out + err
    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    refs.append({a: reference(p, tmp_path / f"t1-{a}.raw") for a, p in images.items()})
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config)
    assert code == 0, out + err
    assert "level incremental" in out
    assert "left the snapshot" not in out + err

    assert len(engine.activity.hybrid) == 2  # both were hybrid backups
    assert not engine.activity.snapshots and await call(engine, snapshot_names) == []
    codes = [e.code for e in engine.activity.events]
    assert codes.count(SNAPSHOT_CREATED) == codes.count(SNAPSHOT_REMOVED) == 2
    backups, _ = await assert_clean(engine, HYBRID)
    assert backups == ["succeeded", "succeeded"]

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    snaps = json.loads(out)
    assert [s["level"] for s in snaps] == ["full", "incremental"]
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
