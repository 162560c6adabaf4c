"""A restore into the engine SIGKILLed mid-way: the next start recovers it from the job
journal (``plugins.ovirt.backup.recover``) before doing anything else: the open upload is
cancelled, the VM (if it was created) and every disk the killed restore made are deleted, so
the engine holds nothing of it; the retried restore then succeeds, byte-exact.

Killed at two places (``engine.util.failpoints``, ``tests.integration.kill_backup``): during
the second disk's upload (the disks are restored two at once: the first one's upload is
finalized or still transferring beside it), and right after the VM was created (every disk
uploaded, none attached yet).
"""

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.integration.images import identical
from tests.ovirt.test_backup_api_flow import ROOT, lab, tessera
from tests.ovirt.test_restore_vm import EngineView, full_backup, view

pytestmark = pytest.mark.integration
__all__ = ["lab"]  # the fixture, shared

Lab = tuple[FakeEngine, Path, dict[str, Path]]

# The seed's first disk (vm1_os) holds tens of 1 MiB chunks, written before the 60th chunk or
# beside the second disk's (vm1_data): by then the second upload is under way, and the first
# is finished or still going. The test checks that.
MID_SECOND_UPLOAD = ("restore.chunk.written", 60)
VM_CREATED = ("ovirt.restore.vm_created", 1)


async def killed_restore(config: Path, snapshot_id: str, at: tuple[str, int]) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.kill_backup",
        at[0],
        str(at[1]),
        "--",
        "restore",
        snapshot_id,
        "--config",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TESSERA_PASSPHRASE": "flow-test"},
    )
    return await proc.wait()


@pytest.mark.parametrize("at", [MID_SECOND_UPLOAD, VM_CREATED], ids=["mid-upload", "vm-created"])
async def test_sigkill_mid_restore_then_recover(
    tmp_path: Path, lab: Lab, at: tuple[str, int]
) -> None:
    engine, config, images = lab
    snapshot_id, refs = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)

    assert await killed_restore(config, snapshot_id, at) == -signal.SIGKILL
    killed = await asyncio.to_thread(view, engine)
    left = killed.disks - before.disks
    assert len(left) == len(images)  # both disks were created
    uploads = killed.transfers[len(before.transfers) :]  # listed in creation order
    if at == MID_SECOND_UPLOAD:
        assert uploads in (["finished_success", "transferring"], ["transferring"] * 2), uploads
        assert set(killed.vms) == {"vm1"}
    else:
        assert uploads == ["finished_success"] * len(images)
        assert set(killed.vms) == {"vm1", "vm1-restored"}
        assert killed.vms["vm1-restored"]["disks"] == {}  # killed before attaching

    code, out, err = await tessera("restore", snapshot_id, "--config", config)
    assert code == 0, out + err
    for disk_id in left:
        assert f"deleted restored disk {disk_id}" in err, err
    if at == MID_SECOND_UPLOAD:
        assert "cancelled upload transfer" in err, err
    else:
        restored_vm = killed.vms["vm1-restored"]["id"]
        assert f"deleted restored VM {restored_vm}" in err, err

    after: EngineView = await asyncio.to_thread(view, engine)
    assert not left & after.disks  # the killed restore's disks are gone
    assert set(after.vms) == {"vm1", "vm1-restored"}
    new = after.vms["vm1-restored"]["disks"]
    assert isinstance(new, dict)
    assert {d["id"] for d in new.values()} == after.disks - before.disks
    assert all(p.startswith("finished") for p in after.transfers), after.transfers
    images_dir = engine.activity.images_dir
    assert images_dir is not None
    assert sorted(p.stem for p in images_dir.iterdir()) == sorted(d["id"] for d in new.values())
    for alias, disk in new.items():
        assert identical(refs[alias], engine.activity.images[disk["id"]]), alias
