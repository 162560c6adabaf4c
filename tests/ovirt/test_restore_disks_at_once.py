"""A VM's disks restored into the engine at once (``limits.restore_disks``, default 2),
observed on the lab engine while the restore runs in its own process:

- imageio uploads: both disks' upload transfers are ``transferring`` at the same moment;
  the disks were created and their transfers opened in manifest order; the VM comes out
  byte-identical with its disks attached, every transfer finished.
- the DataMover (LAN free): both new disks are plugged into the DataMover at once; byte-
  identical, nothing left attached.
- one disk's transfer cancelled by the engine mid-upload while the other uploads: the
  restore fails naming that disk, the other disk's upload is cancelled, both disks are
  deleted and no VM is made.

The lab's storage is throttled (``Faults.storage_iops``) so that each disk's writes take
seconds: the moments looked for then last long enough to be seen by polling the engine's
state; a restore that wrote one disk after the other never shows them at all.
"""

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from plugins.lab.engine import transfers as lab_transfers
from plugins.lab.engine.records import Transfer
from plugins.lab.engine.server import FakeEngine
from tests.integration.images import identical, reference
from tests.ovirt.test_attach_flow import Lab as AttachLab
from tests.ovirt.test_attach_flow import attach_lab
from tests.ovirt.test_backup_api_flow import lab, tessera
from tests.ovirt.test_restore_vm import full_backup, view
from tests.unit.io.leaks import until

pytestmark = pytest.mark.integration
__all__ = ["lab"]  # the fixture, shared

Lab = tuple[FakeEngine, Path, dict[str, Path]]

# Write requests per second each new qemu-nbd of the lab serves: the OS disk's upload
# (tens of 1 MiB chunks) takes seconds, far longer than the second disk needs to be
# created and get its transfer going (about a second of the lab's phases).
UPLOAD_IOPS = 8
# The DataMover's devices are nbdfuse files: a 1 MiB chunk is several FUSE writes.
ATTACH_IOPS = 40
SEEN_WITHIN = 120.0  # seconds; the restore ends (and the test fails) long before


def uploads(engine: FakeEngine) -> list[Transfer]:
    """The upload transfers, in creation order."""
    return [t for t in engine.activity.transfers.values() if t.direction == "upload"]


async def seen_while(
    task: "asyncio.Task[object]", condition: Callable[[], bool], what: str
) -> None:
    """Wait until ``condition()`` holds while the restore ``task`` still runs."""
    await until(lambda: condition() or task.done(), what, SEEN_WITHIN)
    assert condition(), f"the restore ended and never showed: {what}"


async def test_both_uploads_are_transferring_at_once(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    snapshot_id, refs = await full_backup(config, tmp_path, images)
    engine.faults.storage_iops = UPLOAD_IOPS
    restore = asyncio.create_task(tessera("restore", snapshot_id, "--config", config))
    try:
        await seen_while(
            restore,
            lambda: [t.phase for t in uploads(engine)] == ["transferring", "transferring"],
            "both disks' uploads transferring at once",
        )
    finally:
        code, out, err = await restore
    assert code == 0, out + err

    inventory = engine.inventory
    assert [inventory.disks[t.disk_id].alias for t in uploads(engine)] == ["vm1_os", "vm1_data"]
    after = await asyncio.to_thread(view, engine)
    new = after.vms["vm1-restored"]["disks"]
    assert isinstance(new, dict)
    assert set(new) == set(images)
    for alias, disk in new.items():
        assert identical(refs[alias], engine.activity.images[disk["id"]]), alias
    assert all(p == "finished_success" for p in after.transfers), after.transfers


async def test_a_disk_cancelled_by_the_engine_fails_the_restore_naming_it(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    snapshot_id, _ = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)
    engine.faults.storage_iops = UPLOAD_IOPS
    restore = asyncio.create_task(tessera("restore", snapshot_id, "--config", config))
    try:
        await seen_while(
            restore,
            lambda: [t.phase for t in uploads(engine)] == ["transferring", "transferring"],
            "both disks' uploads transferring at once",
        )
        os_upload, data_upload = uploads(engine)
        # What the engine's inactivity monitor does to a transfer it finds idle (the lock
        # is the monitor's: one look at the transfers at a time).
        async with engine.activity._lock:
            await lab_transfers.time_out(engine.activity, data_upload, idle=999)
    finally:
        code, out, err = await restore
    assert code != 0, out + err
    data_disk = data_upload.disk_id
    code_s, snaps, _ = await tessera("snapshots", "--config", config, "--json")
    assert code_s == 0
    (snap,) = json.loads(snaps)
    source = next(d["id"] for d in snap["disks"] if d["name"] == "vm1_data")
    assert f"error: disk vm1_data ({source}): " in out, out
    assert os_upload.phase == "finished_cleanup"  # cancelled by the restore, mid-upload

    after = await asyncio.to_thread(view, engine)
    assert set(after.vms) == set(before.vms) == {"vm1"}
    assert after.disks == before.disks  # both new disks deleted
    assert data_disk not in after.disks and os_upload.disk_id not in after.disks
    assert all(p.startswith(("finished", "cancelled", "paused")) for p in after.transfers)


async def test_both_disks_are_plugged_into_the_datamover_at_once(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with attach_lab(tmp_path, tmp_path_factory) as made:
        lab: AttachLab = made
        refs = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in lab.images.items()}
        config = lab.config("config.yaml")
        backup = ("backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", config)
        code, out, err = await tessera(*backup, "--level", "full")
        assert code == 0, out + err
        code, out, _ = await tessera("snapshots", "--config", config, "--json")
        (doc,) = json.loads(out)
        devices = lab.engine.devices
        assert devices is not None
        lab.engine.faults.storage_iops = ATTACH_IOPS
        before = await lab.view()
        args = ("restore", doc["id"], "--config", config, "--flow", "attach", "--name", "vm1-r")
        restore = asyncio.create_task(tessera(*args))
        try:
            await seen_while(
                restore, lambda: len(devices.plugged) == 2, "both new disks plugged at once"
            )
        finally:
            code, out, err = await restore
        assert code == 0, out + err
        after = await lab.clean()  # nothing attached to the DataMover any more
        new_disks = after["vms"]["vm1-r"]
        assert len(new_disks) == 2 and after["disks"] == before["disks"] | new_disks
        for disk_id in new_disks:
            alias = lab.engine.inventory.disks[disk_id].alias
            assert identical(refs[alias], lab.engine.activity.images[disk_id]), alias
