"""The lab's fault knobs (``plugins.lab.engine.faults``), one test each, and how Tessera behaves:
`tessera backup vm` in a subprocess against the lab (fake engine + real ovirt-imageio +
qemu-nbd), then, read with the real ovirtsdk4, no backup left unfinished and no transfer left
open on the engine."""

import asyncio
import json
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

from engine.core.units import MiB
from engine.io import qemu
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from tests.integration.images import identical, qemu_io, reference
from tests.ovirt import test_backup_api_flow as base
from tests.ovirt.test_backup_api_flow import SEED, tessera

pytestmark = pytest.mark.integration
lab = base.lab  # the fixture, shared
Lab = tuple[FakeEngine, Path, dict[str, Path]]


async def leftovers(engine: FakeEngine, seed: Seed = SEED) -> tuple[list[str], list[str]]:
    """Every backup's phase (all VMs) and every transfer's phase, read with the SDK."""

    def read() -> tuple[list[str], list[str]]:
        conn = sdk.Connection(
            url=engine.url,
            username=seed.username,
            password=seed.password,
            ca_file=str(engine.ca_file),
        )
        try:
            system = conn.system_service()
            backups = [
                str(b.phase.value)
                for vm in system.vms_service().list()
                for b in system.vms_service().vm_service(vm.id).backups_service().list()
            ]
            transfers = [str(t.phase.value) for t in system.image_transfers_service().list()]
            return backups, transfers
        finally:
            conn.close()

    return await asyncio.to_thread(read)


async def assert_clean(engine: FakeEngine, seed: Seed = SEED) -> tuple[list[str], list[str]]:
    """No backup outside succeeded/failed, no transfer not finished; returns both lists."""
    backups, transfers = await leftovers(engine, seed)
    assert all(p in ("succeeded", "failed") for p in backups), backups
    assert all(p.startswith("finished") for p in transfers), transfers
    return backups, transfers


async def backup_vm1(config: Path, *args: str) -> tuple[int, str]:
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, *args)
    return code, out + err


async def test_failed_backup_fails_the_job_with_the_engine_event(lab: Lab) -> None:
    engine, config, _ = lab
    engine.faults.fail_backup_of.add("vm1")
    code, out = await backup_vm1(config, "--level", "full")
    assert code != 0, out
    (backup,) = engine.activity.backups.values()
    assert backup.phase == "failed"
    assert f"Backup {backup.id} for VM vm1 failed" in out, out  # the engine's event, quoted
    assert "FAILED" in out
    assert not engine.faults.fail_backup_of  # one backup only
    backups, transfers = await assert_clean(engine)
    assert backups == ["failed"] and transfers == []

    code, out = await backup_vm1(config, "--level", "full")  # the next one works again
    assert code == 0, out


async def test_missing_bitmap_reads_the_disk_in_full(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    code, out = await backup_vm1(config, "--level", "full")
    assert code == 0, out
    (checkpoint,) = engine.activity.checkpoints
    await qemu.bitmap_remove(images["vm1_os"], checkpoint)  # behind the engine's back
    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    ref = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}

    code, out = await backup_vm1(config)
    assert code == 0, out
    assert "level incremental" in out
    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    snap = json.loads(out)[-1]
    disks = {d["name"]: d for d in snap["disks"]}
    assert "backup_mode=full" in disks["vm1_os"]["attributes"]["fallback"]
    assert disks["vm1_os"]["attributes"].get("read", "full") == "full"

    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    store = config.parent / "store"
    code, out, err = await tessera("restore", snap["id"], "--store", store, "--to", out_dir)
    assert code == 0, out + err
    for name, path in ref.items():
        assert identical(path, next(out_dir.glob(f"{name}.*"))), name
    backups, _ = await assert_clean(engine)
    assert backups == ["succeeded", "succeeded"]


async def test_paused_transfer_is_cancelled_and_fails_the_job(lab: Lab) -> None:
    engine, config, _ = lab
    engine.faults.pause_transfers = True
    code, out = await backup_vm1(config, "--level", "full")
    assert code != 0, out
    (transfer,) = engine.activity.transfers.values()
    disk = engine.inventory.disks[transfer.disk_id].alias
    assert f"disk {disk}" in out and f"transfer {transfer.id}" in out, out
    assert "paused_system" in out and "cancelled" in out
    backups, transfers = await assert_clean(engine)
    assert backups == ["succeeded"]  # finalized: the engine keeps no backup open
    assert transfers == ["finished_cleanup"]


async def test_a_few_503s_are_retried(lab: Lab) -> None:
    engine, config, _ = lab
    engine.faults.http_5xx = 2
    code, out = await backup_vm1(config, "--level", "full")
    assert code == 0, out
    assert engine.faults.http_5xx == 0
    backups, _ = await assert_clean(engine)
    assert backups == ["succeeded"]


async def test_a_long_run_of_503s_fails_clearly(lab: Lab) -> None:
    engine, config, _ = lab
    engine.faults.http_5xx = 1000
    code, out = await backup_vm1(config, "--level", "full")
    assert code != 0, out
    assert "engine unavailable: HTTP 503" in out and "Faults.http_5xx" in out, out
    assert not engine.activity.backups  # it failed before creating anything
    engine.faults.http_5xx = 0
    await assert_clean(engine)


async def test_slow_responses_still_back_up(lab: Lab) -> None:
    engine, config, _ = lab
    engine.faults.slow_ms = 50
    code, out = await backup_vm1(config, "--level", "full")
    assert code == 0, out
    backups, transfers = await assert_clean(engine)
    assert backups == ["succeeded"] and transfers


async def test_require_quiesce_refuses_a_vm_without_agent(tmp_path: Path) -> None:
    seed = Seed(
        vms=(VmSeed(name="quiet", guest_agent=False, disks=(DiskSeed("quiet_os", 16 * MiB),)),)
    )
    (tmp_path / "password").write_text(seed.password)
    async with FakeEngine(seed, tmp_path) as engine:
        config = tmp_path / "config.yaml"
        config.write_text(
            "stores:\n"
            f"  - name: main\n    path: {tmp_path / 'store'}\n"
            "engines:\n"
            f"  - name: lab\n    url: {engine.url}\n    username: {seed.username}\n"
            f"    password_file: {tmp_path / 'password'}\n"
            f"    ca_file: {engine.ca_file}\n"
        )
        code, _, err = await tessera("store", "init", tmp_path / "store")
        assert code == 0, err
        code, out, err = await tessera(
            "backup", "vm", "quiet", "--config", config, "--require-quiesce"
        )
        assert code != 0, out + err
        assert "VM quiet: no responsive guest agent" in out + err
        assert not engine.activity.backups and not engine.activity.transfers
        assert not engine.activity.snapshots
        assert await assert_clean(engine, seed) == ([], [])
