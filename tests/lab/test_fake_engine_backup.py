"""The real ovirtsdk4 client runs SDK-EX ``backup_vm.py``'s sequence against the fake engine.

Real data path: the engine adds qcow2 bitmaps with qemu-img, serves each transfer with
qemu-nbd through a real ovirt-imageio daemon, and Tessera's own ``ImageioDisk`` reads it.
SDK calls run in worker threads (``asyncio.to_thread``). The engine runs on a ``FakeClock``
the tests move (``tests.lab.polling``): polling loops step it between looks, and no test
waits for the engine in real time. Only imageio, a real program, counts a ticket's idle time
in real seconds: the inactivity tests wait for that.
"""

import asyncio
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from engine.core.units import KiB, MiB
from engine.io import qemu
from plugins.lab.engine import DiskSeed, FakeClock, FakeEngine, Seed, VmSeed, lab_id
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.imageio import ImageioDisk
from tests.lab.polling import Client, Stepper, steps
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

SIZE = 8 * MiB
RAW_SIZE = 1 * MiB
VM_ID = lab_id("vm", "vm1")
QCOW_ID = lab_id("disk", "vm1_os")
RAW_ID = lab_id("disk", "vm1_raw")
DOWN_VM_ID = lab_id("vm", "vm2")
SPARE_ID = lab_id("disk", "vm2_os")


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    before = leaks.children()
    yield
    assert leaks.children() <= before


async def run(*argv: str | Path | int) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out


async def write(image: Path, fmt: str, pattern: int, offset: int, length: int) -> None:
    await run("qemu-io", "-f", fmt, "-c", f"write -P {pattern:#x} {offset} {length}", image)


async def raw_copy(image: Path, tmp: Path) -> bytes:
    """The guest's view of ``image``: ``qemu-img convert -O raw``."""
    out = tmp / f"{image.stem}.raw-copy"
    await run("qemu-img", "convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


@dataclass
class Lab:
    """A lab engine on a ``FakeClock`` (``engine.clock``) and what the tests need of it."""

    engine: FakeEngine
    daemon: ImageioDaemon | None
    qcow: Path
    raw: Path
    tmp: Path
    spare: Path | None = None

    @property
    def ca(self) -> EngineCa:
        """The engine CA, which also issued imageio's certificate."""
        return EngineCa.from_file(self.engine.ca_file)

    @property
    def stepper(self) -> Stepper:
        assert isinstance(self.engine.clock, FakeClock)  # every fixture here gives one
        return Stepper(self.engine.clock, self.engine.faults, asyncio.get_running_loop())

    async def advance(self, steps: float = 1) -> None:
        """Move the engine's clock ``steps`` phase steps on, nobody polling."""
        await self.stepper.advance(steps)

    async def sdk(self, fn: Callable[[Client], Any]) -> Any:
        """Run ``fn`` in a worker thread with a connection that can step the clock."""
        stepper = self.stepper

        def call() -> Any:
            conn = Client(
                stepper.step,
                url=self.engine.url,
                username=self.engine.username,
                password=self.engine.password,
                ca_file=str(self.engine.ca_file),
                timeout=30,
            )
            try:
                return fn(conn)
            finally:
                conn.close()

        return await asyncio.to_thread(call)


def seed() -> Seed:
    disks = (
        DiskSeed("vm1_os", SIZE, bootable=True),
        DiskSeed("vm1_raw", RAW_SIZE, format="raw", backup="none"),
    )
    spare = VmSeed("vm2", status="down", host=None, disks=(DiskSeed("vm2_os", RAW_SIZE),))
    return Seed(vms=(VmSeed(name="vm1", disks=disks), spare))


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    qcow, raw, spare = tmp_path / "os.qcow2", tmp_path / "data.raw", tmp_path / "spare.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", spare, RAW_SIZE)
    await run("qemu-img", "create", "-q", "-f", "qcow2", qcow, SIZE)
    await write(qcow, "qcow2", 0xAA, 0, MiB)
    await write(qcow, "qcow2", 0xBB, 3 * MiB, 256 * KiB)
    await run("qemu-img", "create", "-q", "-f", "raw", raw, RAW_SIZE)
    await write(raw, "raw", 0x11, 128 * KiB, 64 * KiB)
    workdir = tmp_path / "engine"
    workdir.mkdir()
    images = {QCOW_ID: qcow, RAW_ID: raw, SPARE_ID: spare}
    async with (
        ImageioDaemon(tmp_path) as daemon,
        FakeEngine(seed(), workdir, clock=FakeClock(), images=images, imageio=daemon) as engine,
    ):
        yield Lab(engine, daemon, qcow, raw, tmp_path, spare)


# -- SDK-EX backup_vm.py steps, each one blocking call sequence in a worker thread -----------


def start_backup(conn: Client, from_checkpoint: str | None = None) -> types.Backup:
    backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
    backup = backups.add(
        types.Backup(
            disks=[types.Disk(id=QCOW_ID), types.Disk(id=RAW_ID)],
            from_checkpoint_id=from_checkpoint,
        )
    )
    assert backup.phase == types.BackupPhase.INITIALIZING
    service = backups.backup_service(backup.id)
    for _ in steps(conn):
        backup = service.get()
        if backup.phase == types.BackupPhase.READY:
            return backup
    raise AssertionError(f"backup stuck in {backup.phase}")


def backup_modes(conn: sdk.Connection, backup_id: str) -> dict[str, str]:
    service = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
    disks = service.backup_service(backup_id).disks_service().list()
    return {d.id: d.backup_mode.value for d in disks}


def create_transfer(conn: Client, backup_id: str, disk_id: str) -> types.ImageTransfer:
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(
        types.ImageTransfer(
            disk=types.Disk(id=disk_id),
            backup=types.Backup(id=backup_id),
            direction=types.ImageTransferDirection.DOWNLOAD,
            format=types.DiskFormat.RAW,
            inactivity_timeout=120,
        )
    )
    service = transfers.image_transfer_service(transfer.id)
    for _ in steps(conn):
        transfer = service.get()
        if transfer.phase == types.ImageTransferPhase.TRANSFERRING:
            return transfer
        assert transfer.phase == types.ImageTransferPhase.INITIALIZING
    raise AssertionError(f"transfer stuck in {transfer.phase}")


def finalize_transfer(conn: Client, transfer_id: str) -> None:
    service = conn.system_service().image_transfers_service().image_transfer_service(transfer_id)
    service.finalize()
    for _ in steps(conn):
        if service.get().phase == types.ImageTransferPhase.FINISHED_SUCCESS:
            return
    raise AssertionError("transfer did not finish")


def stop_backup(conn: Client, backup_id: str) -> types.Backup:
    backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
    service = backups.backup_service(backup_id)
    service.finalize()
    for _ in steps(conn):
        backup = service.get()
        if backup.phase == types.BackupPhase.SUCCEEDED:
            return backup
    raise AssertionError(f"backup stuck in {backup.phase}")


async def read_all(url: str, size: int, ca: EngineCa, readers: int = 4) -> bytes:
    """Read ``[0, size)`` through imageio (verified with the engine ``ca``) with ``readers``
    parallel connections."""
    buf = bytearray(size)
    chunk = 256 * KiB
    async with await ImageioDisk.connect(url, url, ca=ca) as disk:
        assert await disk.size() == size

        async def stripe(first: int) -> None:
            reader = await disk.open_reader()
            try:
                for offset in range(first * chunk, size, readers * chunk):
                    n = min(chunk, size - offset)
                    await reader.readinto(offset, memoryview(buf)[offset : offset + n])
            finally:
                await reader.close()

        await asyncio.gather(*(stripe(i) for i in range(readers)))
    return bytes(buf)


async def test_the_engine_publishes_the_ca_that_issued_imageio_certificate(lab: Lab) -> None:
    """As a real engine: one CA for the engine's HTTPS and imageio's, served at pki-resource
    to anyone (no token), and ovirt-imageio's own client downloads with it (as ovirt-img
    and the SDK examples do)."""
    assert lab.daemon is not None
    pem = lab.engine.ca_file.read_bytes()
    assert lab.daemon.ca_file.read_bytes() == pem
    base = f"https://127.0.0.1:{lab.engine.port}/ovirt-engine/services/pki-resource"
    context = ssl.create_default_context(cafile=lab.engine.ca_file)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        query = {"resource": "ca-certificate", "format": "X509-PEM-CA"}
        async with http.get(base, params=query) as resp:
            assert resp.status == 200
            assert await resp.read() == pem
        async with http.get(base, params={"resource": "engine-certificate"}) as resp:
            assert resp.status == 400

    backup = await lab.sdk(start_backup)
    transfer = await lab.sdk(partial(create_transfer, backup_id=backup.id, disk_id=QCOW_ID))
    out = lab.tmp / "ovirt-imageio-client.raw"
    # In its own process, as ovirt-img runs it (the client leaves a socket for the GC).
    download = "import sys; from ovirt_imageio import client; client.download(*sys.argv[1:])"
    await run(sys.executable, "-c", download, transfer.transfer_url, out, lab.engine.ca_file, "raw")
    await run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", lab.qcow, out)
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    await lab.sdk(lambda c: stop_backup(c, backup.id))


async def test_full_then_incremental_backup(lab: Lab) -> None:
    # Full backup: one checkpoint (bitmap in the qcow2 only), both disks full.
    backup = await lab.sdk(start_backup)
    assert backup.vm.id == VM_ID
    assert backup.from_checkpoint_id is None
    checkpoint = backup.to_checkpoint_id
    assert checkpoint is not None
    assert await lab.sdk(lambda c: backup_modes(c, backup.id)) == {QCOW_ID: "full", RAW_ID: "full"}
    assert await qemu.bitmaps(lab.qcow, force_share=True) == [checkpoint]

    for disk_id, image in ((QCOW_ID, lab.qcow), (RAW_ID, lab.raw)):
        transfer = await lab.sdk(partial(create_transfer, backup_id=backup.id, disk_id=disk_id))
        assert transfer.transfer_url == transfer.proxy_url
        assert transfer.transfer_url.startswith("https://127.0.0.1:")  # TLS, as the engine
        expected = await raw_copy(image, lab.tmp)
        assert await read_all(transfer.transfer_url, len(expected), lab.ca) == expected
        await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    done = await lab.sdk(lambda c: stop_backup(c, backup.id))
    assert done.to_checkpoint_id == checkpoint

    # The guest writes; an incremental backup sees exactly those ranges as dirty.
    written = [(MiB + 64 * KiB, 64 * KiB), (6 * MiB, 128 * KiB)]
    for (offset, length), pattern in zip(written, (0xCC, 0xDD), strict=True):
        await write(lab.qcow, "qcow2", pattern, offset, length)
    inc = await lab.sdk(lambda c: start_backup(c, checkpoint))
    assert inc.from_checkpoint_id == checkpoint
    assert inc.to_checkpoint_id not in (None, checkpoint)
    modes = await lab.sdk(lambda c: backup_modes(c, inc.id))
    assert modes == {QCOW_ID: "incremental", RAW_ID: "full"}

    transfer = await lab.sdk(lambda c: create_transfer(c, inc.id, QCOW_ID))
    expected = await raw_copy(lab.qcow, lab.tmp)
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as disk:
        dirty = [(e.start, e.length) for e in await disk.extents("dirty", 0, SIZE) if e.dirty]
        assert dirty == written
        reader = await disk.open_reader()
        try:
            for offset, length in dirty:
                buf = bytearray(length)
                await reader.readinto(offset, memoryview(buf))
                assert buf == expected[offset : offset + length]
        finally:
            await reader.close()
    await lab.sdk(lambda c: finalize_transfer(c, transfer.id))
    await lab.sdk(lambda c: stop_backup(c, inc.id))

    def chain(conn: sdk.Connection) -> list[types.Checkpoint]:
        vm = conn.system_service().vms_service().vm_service(VM_ID)
        return list(vm.checkpoints_service().list())

    checkpoints = await lab.sdk(chain)
    assert [(c.id, c.parent_id) for c in checkpoints] == [
        (checkpoint, None),
        (inc.to_checkpoint_id, checkpoint),
    ]
    assert all(c.state == types.CheckpointState.CREATED for c in checkpoints)
    assert all(c.creation_date.tzinfo is not None for c in checkpoints)


def fault(fn: Callable[[sdk.Connection], Any]) -> Callable[[sdk.Connection], sdk.Error]:
    def call(conn: sdk.Connection) -> sdk.Error:
        with pytest.raises(sdk.Error) as info:
            fn(conn)
        return info.value

    return call


async def test_refusals(lab: Lab) -> None:
    def add(conn: sdk.Connection, from_checkpoint: str | None = None) -> types.Backup:
        backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
        return backups.add(
            types.Backup(disks=[types.Disk(id=QCOW_ID)], from_checkpoint_id=from_checkpoint)
        )

    e = await lab.sdk(fault(lambda c: add(c, "4b9f1c9e-0000-4000-8000-000000000000")))
    assert e.code == 400
    assert "Checkpoint ID 4b9f1c9e-0000-4000-8000-000000000000 doesn't exist" in str(e)

    backup = await lab.sdk(add)
    e = await lab.sdk(fault(add))
    assert e.code == 409
    assert "[Cannot backup VM. The VM is during a backup operation.]" in str(e)

    e = await lab.sdk(fault(lambda c: create_transfer(c, backup.id, QCOW_ID)))
    assert e.code == 409
    assert "backup phase is INITIALIZING" in str(e)

    await lab.sdk(start_backup_wait(backup.id))
    transfer = await lab.sdk(lambda c: create_transfer(c, backup.id, QCOW_ID))
    e = await lab.sdk(fault(lambda c: stop_backup(c, backup.id)))
    assert e.code == 409
    assert "active image transfer" in str(e)

    def service(conn: sdk.Connection) -> Any:
        return conn.system_service().image_transfers_service().image_transfer_service(transfer.id)

    await lab.sdk(lambda c: service(c).cancel())
    # The cancel finishes on its own, one phase step at a time, with nobody polling (the
    # engine's background work).
    t = lab.engine.activity.transfers[transfer.id]
    assert t.phase == "cancelled_user"
    await lab.advance()
    assert t.phase == "finalizing_cleanup"
    await lab.advance()
    assert t.phase == "finished_cleanup"
    seen = await lab.sdk(lambda c: service(c).get())
    assert seen.phase == types.ImageTransferPhase.FINISHED_CLEANUP
    await lab.sdk(lambda c: stop_backup(c, backup.id))


def start_backup_wait(backup_id: str) -> Callable[[Client], None]:
    def wait(conn: Client) -> None:
        backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
        for _ in steps(conn):
            if backups.backup_service(backup_id).get().phase == types.BackupPhase.READY:
                return
        raise AssertionError("backup not ready")

    return wait


async def test_checkpoint_delete_removes_the_bitmap_and_relinks(lab: Lab) -> None:
    first = await lab.sdk(start_backup)
    await lab.sdk(lambda c: stop_backup(c, first.id))
    second = await lab.sdk(lambda c: start_backup(c, first.to_checkpoint_id))
    await lab.sdk(lambda c: stop_backup(c, second.id))
    names = [first.to_checkpoint_id, second.to_checkpoint_id]
    assert await qemu.bitmaps(lab.qcow) == names

    def remove(conn: sdk.Connection) -> list[types.Checkpoint]:
        service = conn.system_service().vms_service().vm_service(VM_ID).checkpoints_service()
        service.checkpoint_service(first.to_checkpoint_id).remove()
        with pytest.raises(sdk.NotFoundError):
            service.checkpoint_service(first.to_checkpoint_id).get()
        return list(service.list())

    left = await lab.sdk(remove)
    assert [(c.id, c.parent_id) for c in left] == [(second.to_checkpoint_id, None)]
    assert await qemu.bitmaps(lab.qcow) == [second.to_checkpoint_id]

    # The bitmap is gone, so an incremental from it would be full; the checkpoint is gone too.
    e = await lab.sdk(fault(lambda c: start_backup(c, first.to_checkpoint_id)))
    assert e.code == 400

    def events(conn: sdk.Connection) -> list[types.Event]:
        return list(conn.system_service().events_service().list(search=first.id))

    found = await lab.sdk(events)
    assert [e.code for e in found] == [10793, 10794, 10790]  # newest first
    assert all(first.id in e.description for e in found)


async def test_transfers_are_refused_without_imageio(tmp_path: Path) -> None:
    image = tmp_path / "os.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", image, SIZE)
    async with FakeEngine(seed(), tmp_path, clock=FakeClock(), images={QCOW_ID: image}) as engine:
        lab = Lab(engine, None, image, image, tmp_path)
        backup = await lab.sdk(start_backup)
        e = await lab.sdk(fault(lambda c: create_transfer(c, backup.id, QCOW_ID)))
        assert e.code == 409
        assert "no ovirt-imageio" in str(e)
        await lab.sdk(lambda c: stop_backup(c, backup.id))


async def test_upload_writes_the_image(lab: Lab) -> None:
    def add(conn: Client, disk_id: str) -> types.ImageTransfer:
        transfers = conn.system_service().image_transfers_service()
        t = transfers.add(
            types.ImageTransfer(
                disk=types.Disk(id=disk_id), direction=types.ImageTransferDirection.UPLOAD
            )
        )
        assert t.host is not None and t.host.id  # the engine picks one: a floating disk
        for _ in steps(conn):
            t = transfers.image_transfer_service(t.id).get()
            if t.phase != types.ImageTransferPhase.INITIALIZING:
                break
        return t

    e = await lab.sdk(fault(partial(add, disk_id=QCOW_ID)))  # plugged into a running VM
    assert e.code == 409
    transfer = await lab.sdk(partial(add, disk_id=SPARE_ID))
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    data = bytes(range(256)) * (64 * KiB // 256)
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as disk:
        writer = await disk.open_writer()
        try:
            await writer.write(128 * KiB, data)
            await writer.flush()
        finally:
            await writer.close()
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    assert lab.spare is not None
    image = await raw_copy(lab.spare, lab.tmp)
    assert image[128 * KiB : 192 * KiB] == data
    assert image[: 128 * KiB] == bytes(128 * KiB)


async def test_close_stops_qemu_nbd_and_removes_tickets(lab: Lab) -> None:
    backup = await lab.sdk(start_backup)
    transfer = await lab.sdk(partial(create_transfer, backup_id=backup.id, disk_id=QCOW_ID))
    (running,) = lab.engine.activity.transfers.values()
    assert running.nbd is not None
    pid = running.nbd.pid
    assert pid is not None
    assert lab.daemon is not None
    ticket = await lab.daemon.get_ticket(running.ticket)
    assert ticket["transfer_id"] == transfer.id
    assert ticket["dirty"] is False  # a full backup

    await lab.engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped
    with pytest.raises(Exception, match="HTTP 404"):
        await lab.daemon.get_ticket(running.ticket)
    await lab.engine.close()  # idempotent


async def test_missing_bitmap_pauses_the_transfer(lab: Lab) -> None:
    full = await lab.sdk(start_backup)
    await lab.sdk(lambda c: stop_backup(c, full.id))
    inc = await lab.sdk(lambda c: start_backup(c, full.to_checkpoint_id))
    # Behind the engine's back, from every layer (a hybrid backup reads its snapshot's).
    for path in lab.engine.activity.chain(lab.engine.inventory.disks[QCOW_ID]):
        await qemu.bitmap_remove(path, full.to_checkpoint_id)

    def transfer(conn: Client) -> tuple[types.ImageTransfer, list[types.Event]]:
        service = conn.system_service().image_transfers_service()
        t = service.add(
            types.ImageTransfer(
                disk=types.Disk(id=QCOW_ID),
                backup=types.Backup(id=inc.id),
                direction=types.ImageTransferDirection.DOWNLOAD,
            )
        )
        for _ in steps(conn):
            t = service.image_transfer_service(t.id).get()
            if t.phase != types.ImageTransferPhase.INITIALIZING:
                break
        events = conn.system_service().events_service().list(search="type=1068")
        service.image_transfer_service(t.id).cancel()
        for _ in steps(conn):
            done = service.image_transfer_service(t.id).get()
            if done.phase == types.ImageTransferPhase.FINISHED_CLEANUP:
                break
        assert done.phase == types.ImageTransferPhase.FINISHED_CLEANUP
        return t, list(events)

    paused, events = await lab.sdk(transfer)
    assert paused.phase == types.ImageTransferPhase.PAUSED_SYSTEM
    assert paused.transfer_url is None
    assert [e.severity for e in events] == [types.LogSeverity.ERROR]
    assert paused.id in events[0].description
    await lab.sdk(lambda c: stop_backup(c, inc.id))


async def idle_time(lab: Lab, ticket: str) -> int:
    """The ticket's ``idle_time`` as imageio reports it to the engine (whole real seconds)."""
    assert lab.daemon is not None
    return int((await lab.daemon.get_ticket(ticket))["idle_time"])


async def until_idle(lab: Lab, ticket: str, seconds: int) -> int:
    """Wait until imageio reports the ticket idle for at least ``seconds``; returns its
    ``idle_time``. imageio is a real program counting real seconds on its own clock, which
    no test can step: this polls it, as the engine's monitor does."""
    async with asyncio.timeout(30):
        while (idle := await idle_time(lab, ticket)) < seconds:
            await asyncio.sleep(0.05)
    return idle


async def test_an_idle_transfer_is_cancelled_even_when_extended(lab: Lab) -> None:
    # The engine's inactivity monitor compares imageio's idle_time, which extend does not
    # reset. imageio counts it in real seconds on its own clock, so this test waits (about
    # two seconds) for it; the engine's looks are the lab clock's.
    lab.engine.faults.inactivity_timeout = 1
    backup = await lab.sdk(start_backup)
    transfer = await lab.sdk(partial(create_transfer, backup_id=backup.id, disk_id=QCOW_ID))
    assert transfer.host is not None and transfer.host.id
    assert transfer.inactivity_timeout == 1

    def extend(conn: Client) -> None:
        conn.system_service().image_transfers_service().image_transfer_service(transfer.id).extend()

    t = lab.engine.activity.transfers[transfer.id]
    await lab.sdk(extend)
    await until_idle(lab, t.ticket, t.inactivity_timeout + 1)
    await lab.sdk(extend)
    assert await idle_time(lab, t.ticket) > t.inactivity_timeout  # extend did not reset it
    assert lab.engine.activity.extends[transfer.id] == 2
    assert t.phase == "transferring"  # idle past its timeout, but the engine has not looked
    await lab.advance()  # the monitor's next looks, on the engine's clock
    assert t.phase == "cancelled_system"
    await lab.advance()
    assert t.phase == "finalizing_failure"
    await lab.advance()
    assert t.phase == "finished_failure"
    (event,) = [e for e in lab.engine.activity.events if e.code == 1072]  # legacy download
    assert transfer.id in event.description and "inactive" in event.description
    assert lab.daemon is not None
    with pytest.raises(Exception, match="HTTP 404"):
        await lab.daemon.get_ticket(t.ticket)  # removed with the transfer
    await lab.sdk(lambda c: stop_backup(c, backup.id))


async def test_reads_keep_a_transfer_open(lab: Lab) -> None:
    # Reads reset imageio's idle_time, which imageio counts in real seconds: three times the
    # ticket is left until it is idle for the whole 1 s timeout, then read, then the engine's
    # monitor looks. Over the ~3 s the transfer lives far past its timeout, kept by reads.
    lab.engine.faults.inactivity_timeout = 1
    backup = await lab.sdk(start_backup)
    transfer = await lab.sdk(partial(create_transfer, backup_id=backup.id, disk_id=QCOW_ID))
    t = lab.engine.activity.transfers[transfer.id]
    async with await ImageioDisk.connect(transfer.transfer_url, ca=lab.ca) as disk:
        reader = await disk.open_reader()
        try:
            for _ in range(3):
                await until_idle(lab, t.ticket, t.inactivity_timeout)
                await reader.readinto(0, memoryview(bytearray(4096)))
                assert await idle_time(lab, t.ticket) < t.inactivity_timeout  # reset by the read
                await lab.advance()
                assert t.phase == "transferring"
        finally:
            await reader.close()
    await lab.sdk(partial(finalize_transfer, transfer_id=transfer.id))
    await lab.sdk(lambda c: stop_backup(c, backup.id))
