"""The fake engine's background work: phases move with time, whoever polls.

The real engine advances image transfers, backups and checkpoint deletes in its own
threads (``TransferDiskImageCommand`` polled by the command coordinator, the backup and
checkpoint commands' callbacks); a client's GET only reads where they are. ``run`` is that
work for one ``Activity``: every ``TICK`` seconds of the activity's clock (``clock``: the
real one, or a test's ``FakeClock``, which only ``advance`` moves) ``tick`` looks at every
object, under the activity's lock, and moves each whose phase is ``Faults.phase_seconds`` old
on that clock one step:

- transfers: ``transfers.step`` (initializing → transferring or paused_system; the
  inactivity monitor on transferring ones: it looks when this clock says, and compares the
  ticket's ``idle_time``, which imageio counts on its own, real clock; cancelled/finalizing
  → finished);
- backups: ``Activity.advance_backup`` (a finalizing hybrid backup first waits one step for
  its snapshot to go, ``hybrid.removing``);
- checkpoint deletes of a down VM: ``Activity.finish_checkpoint_delete``;
- VM snapshots: ``snapshots.step`` (created locked → ok; a deleted one goes);
- new disks (``POST disks``): ``restore.finish_disk`` (locked → ok), once
  ``Faults.disk_seconds`` old rather than ``phase_seconds``.

``FakeEngine`` owns the task (started by ``start()``, cancelled and awaited by ``close()``);
tests that build an app without a server call ``tick`` themselves. A tick that fails is
logged and the next one runs: one bad object must not stop the engine's clock.
"""

import logging
from typing import Final

from plugins.lab.engine import hybrid, restore, snapshots, transfers
from plugins.lab.engine.backup import Activity

# Seconds between two looks: well below every phase time a test sets, so a step happens
# within one tick of becoming due (the engine's own polling is seconds; the lab's is faster).
TICK: Final = 0.05

_log = logging.getLogger(__name__)


async def tick(a: Activity) -> None:
    """Move every transfer, backup, cold checkpoint delete, snapshot and new disk due one
    step."""
    async with a._lock:
        for t in list(a.transfers.values()):
            await transfers.step(a, t)
        for b in list(a.backups.values()):
            if not a.due(b.since):
                continue
            if b.phase == "finalizing" and hybrid.removing(a, b):
                b.since = a.clock.now()  # the snapshot went this step; succeeded at the next
                continue
            a.advance_backup(b)
        for c_id, since in list(a.deleting_checkpoints.items()):
            if a.due(since):
                a.finish_checkpoint_delete(a.checkpoints[c_id])
        for s in list(a.snapshots.values()):
            snapshots.step(a, s)
        for disk_id, since in list(a.creating_disks.items()):
            if a.due(since, a.faults.disk_seconds):
                restore.finish_disk(a, disk_id)


async def run(a: Activity) -> None:
    """``tick`` every ``TICK`` seconds of ``a.clock`` until cancelled."""
    while True:
        try:
            await tick(a)
        except Exception:  # noqa: BLE001 - the engine keeps running; the log says why
            _log.exception("lab engine monitor tick failed")
        await a.clock.sleep(TICK)
