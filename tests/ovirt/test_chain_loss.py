"""Checkpoint chain loss after a VM restart (API-NOTES § 4.8), the field's top complaint: the
engine redefines a restarted VM's checkpoints before its next live backup; when that fails it
removes the whole chain and fails the backup with events 10791 and 10792. The lab does the
same after ``Activity.restart_vm(redefine_fails=True)``; Tessera must read the disks in full
in the same run, with the reason recorded, instead of failing the job."""

import asyncio
import json
from pathlib import Path

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import pytest

from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import lab_id
from tests.integration.images import identical, qemu_io, reference
from tests.ovirt import test_backup_api_flow as base
from tests.ovirt.test_backup_api_flow import SEED, tessera
from tests.ovirt.test_faults import assert_clean, backup_vm1

pytestmark = pytest.mark.integration
lab = base.lab  # the fixture, shared
Lab = tuple[FakeEngine, Path, dict[str, Path]]
VM1 = lab_id("vm", "vm1")


async def test_lab_loses_the_chain_as_the_engine_does(lab: Lab) -> None:
    engine, config, _ = lab
    code, out = await backup_vm1(config, "--level", "full")
    assert code == 0, out
    (old,) = engine.activity.checkpoints
    await engine.activity.restart_vm(VM1, redefine_fails=True)

    def check() -> None:
        conn = sdk.Connection(
            url=engine.url,
            username=SEED.username,
            password=SEED.password,
            ca_file=str(engine.ca_file),
        )
        try:
            vm = conn.system_service().vms_service().vm_service(VM1)
            disks = [t.Disk(id=lab_id("disk", "vm1_os"))]
            b = vm.backups_service().add(t.Backup(disks=disks, from_checkpoint_id=old))
            service = vm.backups_service().backup_service(b.id)
            while (phase := service.get().phase) not in (t.BackupPhase.FAILED, t.BackupPhase.READY):
                pass
            assert phase == t.BackupPhase.FAILED
            assert vm.checkpoints_service().list() == []  # the whole chain is gone
            events = conn.system_service().events_service().list(search=b.id)
            assert {e.code for e in events} >= {10791, 10792}
            with pytest.raises(sdk.Error, match="doesn't exist"):
                vm.backups_service().add(t.Backup(disks=disks, from_checkpoint_id=old))
        finally:
            conn.close()

    await asyncio.to_thread(check)  # the SDK blocks; the engine runs on this loop


async def test_chain_loss_becomes_a_full_read_in_the_same_run(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    code, out = await backup_vm1(config, "--level", "full")
    assert code == 0, out
    await engine.activity.restart_vm(VM1, redefine_fails=True)
    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    ref = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}

    code, out = await backup_vm1(config)
    assert code == 0, out  # not a failed job
    backups, _ = await assert_clean(engine)
    assert backups == ["succeeded", "failed", "succeeded"]
    assert len(engine.activity.checkpoints) == 1  # a new chain, from this run's full backup

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    snap = json.loads(out)[-1]
    for disk in snap["disks"]:
        assert disk["attributes"]["read"] == "full"
    fallback = {d["name"]: d["attributes"].get("fallback", "") for d in snap["disks"]}
    assert "dropped the checkpoint chain" in fallback["vm1_os"], fallback
    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    code, out, err = await tessera(
        "restore", snap["id"], "--store", tmp_path / "store", "--to", out_dir
    )
    assert code == 0, out + err
    for name, path in ref.items():
        assert identical(path, next(out_dir.glob(f"{name}.*"))), name

    code, out = await backup_vm1(config)  # and the next incremental works from the new chain
    assert code == 0, out
    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    assert json.loads(out)[-1]["disks"][0]["attributes"]["read"] == "dirty"
