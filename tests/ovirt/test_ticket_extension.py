"""Image transfers that outlive their imageio ticket: Tessera extends the ticket (the engine's
``extend`` action, which the lab turns into imageio's ``PATCH /tickets/{id}``) while a transfer
is open, so a backup and a restore on slow storage succeed.

The lab's tickets live ``Faults.ticket_timeout`` = 3 s after their creation, their last
completed request (imageio's own renewal) or their last extend; ``Faults.storage_iops``
throttles every qemu-nbd export so that reading one disk takes well over 3 s. A backup makes
each disk's transfer only when it reads that disk, so no ticket sits idle that long even
without extends (``test_idle_transfers`` has the engine's inactivity monitor). An upload uses
its ticket continuously (imageio renews it on every
request), so the restore test checks that each upload was extended while it ran and that the
data arrived intact. ``tessera`` runs in a subprocess with
``plugins.ovirt.imageio.EXTEND_INTERVAL`` set (1 s, or an hour for "never").
"""

import asyncio
import os
import sys
from pathlib import Path

import pytest

from engine.core.errors import EngineError
from plugins.lab.engine.server import FakeEngine
from plugins.ovirt.imageio import TicketKeeper
from tests.integration.images import identical
from tests.ovirt.test_backup_api_flow import ROOT, lab
from tests.ovirt.test_faults import assert_clean
from tests.ovirt.test_restore_vm import full_backup, view

pytestmark = pytest.mark.integration
__all__ = ["lab"]  # the fixture, shared

Lab = tuple[FakeEngine, Path, dict[str, Path]]

TICKET_TIMEOUT = 3  # seconds
# Requests per second of the throttled storage: the seed's disks take far more requests than
# TICKET_TIMEOUT × IOPS, so every transfer outlives an unextended ticket.
IOPS = 4
EXTEND_OFTEN = 1.0  # well inside the ticket's 3 s
EXTEND_NEVER = 3600.0
_RUN = (
    "import sys; import plugins.ovirt.imageio as m; m.EXTEND_INTERVAL = float(sys.argv[1]); "
    "from engine.cli.main import main; sys.exit(main(sys.argv[2:]))"
)


async def tessera(interval: float, *args: str | Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _RUN,
        str(interval),
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TESSERA_PASSPHRASE": "flow-test"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def slow_storage(engine: FakeEngine) -> None:
    engine.faults.ticket_timeout = TICKET_TIMEOUT
    engine.faults.storage_iops = IOPS


# -- the schedule --------------------------------------------------------------------------


async def test_keeper_extends_every_interval_until_stopped() -> None:
    sleeps: list[float] = []
    extends = 0
    third = asyncio.Event()

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    async def extend() -> None:
        nonlocal extends
        extends += 1
        if extends == 2:
            raise EngineError(message="engine unavailable")  # logged, tried again
        if extends == 3:
            third.set()

    keeper = TicketKeeper(extend, "transfer T", interval=7.5, sleep=sleep)
    keeper.start()
    await third.wait()
    await keeper.stop()
    stopped_at = extends
    assert stopped_at >= 3
    assert keeper.extends == stopped_at - 1  # the failed one does not count
    assert sleeps and set(sleeps) == {7.5}  # an extend after each interval, none before
    assert len(sleeps) in (extends, extends + 1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert extends == stopped_at  # nothing after stop()
    await keeper.stop()  # idempotent


async def test_keeper_stop_does_not_swallow_the_callers_cancellation() -> None:
    async def extend() -> None:
        return None

    keeper = TicketKeeper(extend, "transfer T", interval=3600.0)
    keeper.start()
    blocker = asyncio.Event()

    async def owner() -> None:
        try:
            await blocker.wait()
        finally:
            await keeper.stop()

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_default_interval_is_well_inside_the_engines_ticket() -> None:
    async def extend() -> None:
        return None

    keeper = TicketKeeper(extend, "transfer T")
    assert keeper.interval * 4 <= 300  # ImageTransferClientTicketValidityInSeconds
    with pytest.raises(ValueError, match="transfer T"):
        TicketKeeper(extend, "transfer T", interval=0)


# -- end to end ----------------------------------------------------------------------------


async def test_backup_outlives_its_tickets(tmp_path: Path, lab: Lab) -> None:
    # Each disk's transfer is made when that disk is read and finalized right after, and
    # every completed read renews its ticket: even never extended, no ticket expires.
    engine, config, _ = lab
    slow_storage(engine)
    code, out = await tessera(
        EXTEND_NEVER, "backup", "vm", "vm1", "--config", config, "--level", "full"
    )
    assert code == 0, out
    backups, transfers = await assert_clean(engine)
    assert backups == ["succeeded"], backups
    assert len(transfers) == 2, transfers


async def test_restore_outlives_its_tickets(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    snapshot_id, refs = await full_backup(config, tmp_path, images)
    slow_storage(engine)

    code, out = await tessera(EXTEND_OFTEN, "restore", snapshot_id, "--config", config)
    assert code == 0, out
    after = await asyncio.to_thread(view, engine)
    restored = after.vms["vm1-restored"]["disks"]
    assert isinstance(restored, dict) and set(restored) == set(images)
    uploads = [t for t in engine.activity.transfers.values() if t.direction == "upload"]
    assert len(uploads) == len(images)
    assert all(engine.activity.extends.get(t.id, 0) >= 1 for t in uploads), engine.activity.extends
    for alias, disk in restored.items():
        assert identical(refs[alias], engine.activity.images[disk["id"]]), alias
