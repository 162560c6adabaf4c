"""The engine's checkpoint chain under Tessera (``plugins.ovirt.checkpoints``), end to end:
`tessera backup vm` against the lab, on a VM that is down, so each checkpoint delete is cold:
the fake shows it ``invalid`` for a phase step, then 404, and the client polls until then.

- After each successful backup Tessera deletes its own checkpoints older than the new one,
  except the last full's (differentials start there), oldest first, polling each until gone;
  another product's checkpoint is left alone; incrementals keep working on the thinned chain.
- A parent checkpoint an administrator deleted makes the next incremental read every disk in
  full, the reason recorded, instead of failing on the engine's 400."""

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
from plugins.lab.engine.records import VM_CHECKPOINT_DELETED
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed, lab_id
from plugins.lab.imageio import ImageioDaemon
from tests.integration.images import identical, qemu_io, reference, run
from tests.lab.polling import polls
from tests.ovirt.test_backup_api_flow import tessera
from tests.ovirt.test_faults import assert_clean

pytestmark = pytest.mark.integration

SEED = Seed(
    vms=(
        VmSeed(
            name="cold",
            status="down",
            host=None,
            disks=(DiskSeed("cold_os", 64 * MiB, bootable=True),),
        ),
    )
)
VM_ID = lab_id("vm", "cold")
DISK_ID = lab_id("disk", "cold_os")

Lab = tuple[FakeEngine, Path, Path]


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    image = tmp_path / "cold_os.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB))
    qemu_io(image, "write -P 0x11 0 4M", "write -P 0x22 40M 2M")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    async with (
        ImageioDaemon(base_dir=tmp_path) as daemon,
        FakeEngine(SEED, engine_dir, images={DISK_ID: image}, imageio=daemon) as engine,
    ):
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
        yield engine, config, image


async def call(engine: FakeEngine, fn: Callable[[sdk.Connection], Any]) -> Any:
    def go() -> Any:
        conn = sdk.Connection(
            url=engine.url,
            username=SEED.username,
            password=SEED.password,
            ca_file=str(engine.ca_file),
        )
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(go)


def checkpoints(conn: sdk.Connection) -> Any:
    return conn.system_service().vms_service().vm_service(VM_ID).checkpoints_service()


def chain(conn: sdk.Connection) -> list[tuple[str, str | None]]:
    return [(c.id, c.parent_id) for c in checkpoints(conn).list()]


def foreign_backup(conn: sdk.Connection) -> str:
    """Another product's full backup (SDK-EX ``backup_vm.py``): its checkpoint id."""
    backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
    b = backups.add(types.Backup(disks=[types.Disk(id=DISK_ID)], description="OtherProduct"))
    service = backups.backup_service(b.id)
    for _ in polls():
        if (b := service.get()).phase == types.BackupPhase.READY:
            break
    service.finalize()
    for _ in polls():
        if service.get().phase == types.BackupPhase.SUCCEEDED:
            return str(b.to_checkpoint_id)
    raise AssertionError("the foreign backup did not finish")


def admin_delete(conn: sdk.Connection, checkpoint: str) -> None:
    """What an administrator does: delete, then wait for the cold delete to end."""
    service = checkpoints(conn).checkpoint_service(checkpoint)
    service.remove()
    for _ in polls():
        try:
            service.get()
        except sdk.NotFoundError:
            return
    raise AssertionError(f"checkpoint {checkpoint} stayed")


async def backup(config: Path, *args: str) -> dict[str, Any]:
    """Run one backup; return its snapshot as `tessera snapshots --json` lists it."""
    code, out, err = await tessera("backup", "vm", "cold", "--config", config, *args)
    assert code == 0, out + err
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, out + err
    snap: dict[str, Any] = json.loads(out)[-1]
    return snap


def checkpoint_of(engine: FakeEngine, n: int) -> str:
    """The checkpoint the n-th backup (0-based) made."""
    return str(list(engine.activity.backups.values())[n].to_checkpoint_id)


async def restored_equals(tmp_path: Path, config: Path, snap: dict[str, Any], ref: Path) -> bool:
    out_dir = tmp_path / f"restored-{snap['id']}"
    out_dir.mkdir()
    code, out, err = await tessera(
        "restore", snap["id"], "--store", config.parent / "store", "--to", out_dir
    )
    assert code == 0, out + err
    return identical(ref, next(out_dir.glob("cold_os.*")))


async def test_stale_checkpoints_are_deleted_oldest_first(tmp_path: Path, lab: Lab) -> None:
    engine, config, image = lab
    await backup(config, "--level", "full")
    full = checkpoint_of(engine, 0)
    other = await call(engine, foreign_backup)
    assert [c for c, _ in await call(engine, chain)] == [full, other]

    qemu_io(image, "write -P 0x33 8M 1M")
    await backup(config)  # incremental from the full's: nothing is stale yet
    first_inc = checkpoint_of(engine, 2)
    assert [c for c, _ in await call(engine, chain)] == [full, other, first_inc]

    qemu_io(image, "write -P 0x44 20M 1M")
    await backup(config)  # the first incremental's checkpoint goes; the full's stays
    second_inc = checkpoint_of(engine, 3)
    assert await call(engine, chain) == [(full, None), (other, full), (second_inc, other)]

    qemu_io(image, "write -P 0x55 30M 1M")
    ref = reference(image, tmp_path / "ref.raw")
    snap = await backup(config)  # incremental on the thinned chain
    assert snap["level"] == "incremental"
    assert snap["disks"][0]["attributes"]["read"] == "dirty"
    assert await restored_equals(tmp_path, config, snap, ref)
    third_inc = checkpoint_of(engine, 4)
    assert [c for c, _ in await call(engine, chain)] == [full, other, third_inc]

    await backup(config, "--level", "full")  # a new full: the old full's goes too
    new_full = checkpoint_of(engine, 5)
    assert [c for c, _ in await call(engine, chain)] == [other, new_full]  # not ours: kept
    assert await qemu.bitmaps(image, force_share=True) == [other, new_full]

    # Every delete ran to its end: Tessera polled each until the fake had finished it.
    assert not engine.activity.deleting_checkpoints
    deleted = [e.description for e in engine.activity.events if e.code == VM_CHECKPOINT_DELETED]
    assert [d.split()[1] for d in deleted] == [first_inc, second_inc, full, third_inc]
    await assert_clean(engine, SEED)


async def test_a_deleted_parent_checkpoint_means_a_full_read(tmp_path: Path, lab: Lab) -> None:
    engine, config, image = lab
    await backup(config, "--level", "full")
    await call(engine, lambda c: admin_delete(c, checkpoint_of(engine, 0)))
    qemu_io(image, "write -P 0x66 12M 1M")
    ref = reference(image, tmp_path / "ref.raw")

    snap = await backup(config)
    assert snap["level"] == "incremental"  # asked for, and recorded so
    attributes = snap["disks"][0]["attributes"]
    assert "no longer exists on the engine" in attributes["fallback"], attributes
    assert attributes.get("read", "full") == "full"
    inc = list(engine.activity.backups.values())[1]
    assert inc.from_checkpoint_id is None  # started as a full backup, not refused
    assert await restored_equals(tmp_path, config, snap, ref)
    assert [c for c, _ in await call(engine, chain)] == [inc.to_checkpoint_id]
    await assert_clean(engine, SEED)
