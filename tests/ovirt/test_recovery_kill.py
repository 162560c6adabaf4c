"""A backup SIGKILLed at each step of its cleanup on the engine, then recovered twice.

``tessera backup vm`` runs against the lab (fake engine + real ovirt-imageio + qemu-nbd) in a
subprocess that a failpoint (``engine.util.failpoints``, ``tests.integration.kill_backup``)
kills right after one cleanup step was sent to the engine or finished: a transfer's finalize,
the backup's finalize (flow 1), the snapshot's removal (flow 2). The engine is then left with
that step half-way or done and the next ones not begun; the job journal still lists all of
them. Recovery (``engine.jobs.recovery``, as the next ``tessera`` process runs it) must then:

- succeed: every step either does its work or finds it already done (a transfer already
  finalizing or finished answers 409 ``Phase is …``; a snapshot being removed is ``locked``);
- end the job cleaned (no "cleanup failed" warning) and leave the engine clean: every backup
  succeeded, every transfer finished, no snapshot;
- and when run a second time over the same resources (a recovery killed before it could mark
  the job finished), do nothing and still succeed.
"""

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.jobs.journal import Journal
from engine.jobs.recovery import recover_unfinished
from engine.jobs.states import TERMINAL
from engine.sources import registry
from engine.store.chunk_store import Store
from plugins.lab.engine.server import FakeEngine
from tests.ovirt.test_backup_api_flow import ROOT, lab
from tests.ovirt.test_faults import assert_clean

pytestmark = pytest.mark.integration
__all__ = ["lab"]  # the fixture, shared

Lab = tuple[FakeEngine, Path, dict[str, Path]]
PASSPHRASE = "flow-test"

# (flow, failpoint, nth hit, transfers made): vm1 has two disks, so two transfers, each made
# when its disk is read and finalized right after.
BACKUP_API = [
    ("backup-api", "ovirt.backup.transfer_finalize.sent", 1, 1),  # first finalizing
    ("backup-api", "ovirt.backup.transfer_finalize.done", 1, 1),  # first finished, no second
    ("backup-api", "ovirt.backup.transfer_finalize.done", 2, 2),  # both finished, backup ready
    ("backup-api", "ovirt.backup.finalize.sent", 1, 2),  # backup finalizing
    ("backup-api", "ovirt.backup.finalize.done", 1, 2),  # all done, journal not yet told
]
SNAPSHOT = [
    ("snapshot-imageio", "ovirt.snapshot.transfer_finalize.sent", 1, 1),
    ("snapshot-imageio", "ovirt.snapshot.transfer_finalize.done", 2, 2),
    ("snapshot-imageio", "ovirt.snapshot.remove.sent", 1, 2),  # snapshot being removed
    ("snapshot-imageio", "ovirt.snapshot.remove.done", 1, 2),
]


async def killed_backup(config: Path, flow: str, point: str, nth: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.kill_backup",
        point,
        str(nth),
        "--",
        "backup",
        "vm",
        "vm1",
        "--config",
        str(config),
        "--level",
        "full",
        "--flow",
        flow,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE},
    )
    return await proc.wait()


async def recover(store_path: Path) -> tuple[list[str], list[Any]]:
    """What the next ``tessera`` process does first: the job journal's recovery. Returns its
    lines and every job record afterwards."""
    store = await asyncio.to_thread(Store.open, store_path, passphrase=PASSPHRASE.encode())
    try:
        journal = Journal(store.path / "journal")
        lines = await recover_unfinished(store, journal)
        return lines, journal.records()
    finally:
        store.close()


def engine_state(engine: FakeEngine) -> tuple[object, ...]:
    a = engine.activity
    return (
        {b.id: b.phase for b in a.backups.values()},
        {t.id: t.phase for t in a.transfers.values()},
        sorted(a.snapshots),
        {v.name: sorted(x.disk_id for x in v.attachments) for v in engine.inventory.vms.values()},
    )


@pytest.mark.parametrize(
    ("flow", "point", "nth", "made"),
    BACKUP_API + SNAPSHOT,
    ids=[f"{p}-{n}" for _, p, n, _ in BACKUP_API + SNAPSHOT],
)
async def test_killed_in_cleanup_then_recovered_twice(
    lab: Lab, flow: str, point: str, nth: int, made: int
) -> None:
    engine, config, _ = lab
    assert await killed_backup(config, flow, point, nth) == -signal.SIGKILL

    lines, records = await recover(config.parent / "store")
    text = "\n".join(lines)
    assert "cleanup failed" not in text, text
    (record,) = records
    assert record.state in TERMINAL, text
    assert not record.warnings, record.warnings
    assert f"job {record.job_id}: now " in text
    recovered = record.summary["recovered"]  # what the daemon's job history shows of it
    assert recovered["was"] not in {s.value for s in TERMINAL}, recovered
    assert all(f"was {recovered['was']}): {a}" in text for a in recovered["actions"]), text

    backups, transfers = await assert_clean(engine)
    assert all(p == "succeeded" for p in backups), backups
    assert len(transfers) == made, transfers
    assert not engine.activity.snapshots, engine.activity.snapshots
    cleaned = engine_state(engine)

    # Recovery killed before the journal said so runs again over the same resources.
    committed = "snapshot_id" in record.resources and record.state.value == "succeeded"
    again = await registry.get("ovirt").recover(record.resources, committed)
    assert again == []
    assert engine_state(engine) == cleaned
    _, records = await recover(config.parent / "store")  # and the journal has nothing left
    assert [r.state for r in records] == [record.state]
