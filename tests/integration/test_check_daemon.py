"""``tessera snapshots check`` in the daemon (``Service`` with an in-memory hypervisor whose
VM's disk is the ext4 of the lab's guest disk, ``tests.guest_disks``): a policy with
``restore_check`` checks the restore point its backup made, as a job of its own, ``POST
/v1/snapshots/{id}/check`` checks one on request, and the maintenance schedule's
``restore_check`` checks the newest one of each VM with its policy's paths.

The appliance runs emulated (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``, see
``test_files.py``); each check is one appliance boot. The CLI's checks: ``test_check.py``.
"""

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.api.server import build_app
from engine.daemon import maintenance
from tests.daemon_setup import daemon_config, running
from tests.guest_disks import guest_disk_copy
from tests.integration.test_check import SDA1_OFFSET
from tests.integration.test_new_hypervisor import MemoryHypervisor, installed
from tests.memory import MemoryDisk, MemoryVm

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1800)  # three appliance boots under TCG
async def test_the_daemon_checks_after_a_policy_s_backup_on_request_and_on_schedule(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")  # for the helper
    image = await asyncio.to_thread(guest_disk_copy, tmp_path_factory, tmp_path / "guest.raw")
    with image.open("rb") as f:  # the ext4 of sda1 as a whole disk: /sda in the tree
        f.seek(SDA1_OFFSET)
        disk = MemoryDisk("d1", "web1_os", bytearray(f.read(64 << 20)))
    (tmp_path / "engine-password").write_text("unused\n")
    config = daemon_config(
        tmp_path,
        "check-daemon",
        "engines:\n  - name: mem\n    url: memory://\n    username: nobody\n"
        f"    password_file: {tmp_path / 'engine-password'}\n    plugin: memory\n"
        'maintenance:\n  restore_check: "sun 05:00"\n',
    )
    (tmp_path / "policies.d").mkdir()
    (tmp_path / "policies.d" / "nightly.yaml").write_text(
        "name: nightly\nselection:\n  vms: [web1]\n"
        "restore_check:\n  after_backup: true\n  expect: [/sda/etc/hostname]\n"
    )
    with installed(MemoryHypervisor({"web1": MemoryVm("vm-1", "web1", [disk])})):
        async with running(config) as service:
            (policy,) = service.policies
            await service.run_policy(policy, datetime.now(UTC))
            backup, check = sorted(service.jobs.jobs(), key=lambda v: (v.created, v.kind))
            assert (backup.kind, backup.state) == ("backup", "succeeded"), backup.error
            snapshot = backup.outcome.manifest.snapshot_id  # type: ignore[union-attr]
            assert (check.kind, check.vm, check.policy) == (
                "check",
                f"snapshot:{snapshot}",
                "nightly",
            )
            assert check.state == "succeeded", (check.error, check.lines)
            summary = check.summary
            assert summary["outcome"] == "passed", summary
            assert [(f["name"], f["state"]) for f in summary["filesystems"]] == [("sda", "ok")]
            assert summary["paths"][0]["path"] == "/sda/etc/hostname"
            assert summary["paths"][0]["present"] is True

            async with TestClient(TestServer(build_app(service))) as client:
                response = await client.post(
                    f"/v1/snapshots/{snapshot[:8]}/check", json={"expect": ["/sda/etc/machine-id"]}
                )
                assert response.status == 202, await response.text()
                (job,) = (await response.json())["jobs"]
                asked = service.jobs.get(job["id"])
                assert asked.task is not None
                await asked.task
                assert asked.state == "failed"
                assert "missing /sda/etc/machine-id" in asked.error, asked.error
                doc = await (await client.get(f"/v1/snapshots/{snapshot}")).json()
                assert doc["check"]["outcome"] == "failed", doc
                assert doc["check"]["time"] >= summary["time"]
                (listed,) = await (await client.get("/v1/snapshots")).json()
                assert listed["check"] == doc["check"]

            # the weekly run: the newest restore point of each VM, its policy's expect
            (task,) = maintenance.tasks(service.config.maintenance)
            before = {v.job_id for v in service.jobs.jobs()}
            await maintenance.run_task(service, task)
            (weekly,) = [v for v in service.jobs.jobs() if v.job_id not in before]
            assert (weekly.kind, weekly.vm, weekly.state) == (
                "check",
                f"snapshot:{snapshot}",
                "succeeded",
            )
            assert weekly.params["expect"] == ["/sda/etc/hostname"]
            assert weekly.summary["outcome"] == "passed"
            # the VM's last success is its backup's; a check has no gauge of its own
            metrics = service.metrics.render()[0].decode().splitlines()
            gauges = [m for m in metrics if m.startswith("tessera_last_success")]
            assert any('vm="web1"' in m for m in gauges), gauges
            assert not any("snapshot:" in m for m in gauges), gauges
