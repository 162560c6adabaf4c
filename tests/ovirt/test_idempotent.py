"""``plugins.ovirt.idempotent``: which engine answers mean "already in the wanted state", and
``Steps`` running recovery steps independently. Pure: no engine, no I/O."""

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import pytest

from plugins.ovirt.client import EngineApiError, EngineNotFound, EngineUnavailable
from plugins.ovirt.idempotent import OvirtRecoveryError, Steps, Wanted, already_done

URL = "https://engine/ovirt-engine/api"


def sdk_error(code: int, detail: str) -> sdk.Error:
    fault = t.Fault(reason="Operation Failed", detail=detail)
    return sdk.Error(
        f"Fault reason is 'Operation Failed'. Fault detail is '{detail}'.", code, fault
    )


def mapped(code: int, detail: str) -> EngineApiError:
    """What ``EngineClient.call`` raises for that answer."""
    return EngineApiError(url=URL, what="finalize", object="x", code=code, reason=detail)


FINISHED = "[Cannot finalize image transfer. Phase is finished_success.]"
STOPPED = (
    "[Cannot stop VM Backup. Backup b1 is already in 'succeeded' phase, no need to stop the "
    "backup again.]"
)

ALREADY = [
    (Wanted.TRANSFER_ENDED, 409, FINISHED),
    (Wanted.TRANSFER_ENDED, 409, "[Cannot finalize image transfer. Phase is finalizing_success.]"),
    (Wanted.TRANSFER_ENDED, 409, "[Cannot finalize image transfer. Phase is finished_failure.]"),
    (Wanted.TRANSFER_ENDED, 409, "[Cannot cancel image transfer. Phase is cancelled_user.]"),
    (Wanted.TRANSFER_ENDED, 409, "[Cannot finalize image transfer. Phase is finished_cleanup.]"),
    (Wanted.BACKUP_FINALIZED, 400, STOPPED),
    (Wanted.BACKUP_FINALIZED, 400, STOPPED.replace("succeeded", "finalizing")),
    (Wanted.BACKUP_FINALIZED, 409, STOPPED.replace("succeeded", "failed")),
    (Wanted.BACKUP_FINALIZED, 409, "[Cannot stop VM Backup. The backup is already finalized.]"),
    (Wanted.GONE, 404, "Entity not found: snapshot s1"),
    (Wanted.TRANSFER_ENDED, 404, "Entity not found: image transfer t1"),
    (Wanted.BACKUP_FINALIZED, 404, "Entity not found: backup b1"),
]

NOT_YET = [
    # still to do, or refused for a real reason: these must fail the step
    (Wanted.TRANSFER_ENDED, 409, "[Cannot finalize image transfer. Phase is paused_system.]"),
    (Wanted.TRANSFER_ENDED, 409, "[Cannot finalize image transfer. Phase is transferring.]"),
    (Wanted.TRANSFER_ENDED, 503, FINISHED),  # never an "already" from a server error
    (Wanted.BACKUP_FINALIZED, 409, FINISHED),  # another step's answer
    (
        Wanted.BACKUP_FINALIZED,
        409,
        "[Cannot stop VM Backup. The VM backup has an active image transfer.]",
    ),
    (Wanted.GONE, 409, "[Cannot remove Snapshot. Snapshot is locked.]"),
    (Wanted.GONE, 409, "[Cannot remove Snapshot. A disk of it is attached to VM dm.]"),
    (Wanted.GONE, 409, FINISHED),  # only 404 says something is gone
]


@pytest.mark.parametrize(("wanted", "code", "detail"), ALREADY)
def test_already_done(wanted: Wanted, code: int, detail: str) -> None:
    assert already_done(sdk_error(code, detail), wanted)
    assert already_done(mapped(code, detail), wanted)


@pytest.mark.parametrize(("wanted", "code", "detail"), NOT_YET)
def test_not_done(wanted: Wanted, code: int, detail: str) -> None:
    assert not already_done(sdk_error(code, detail), wanted)
    assert not already_done(mapped(code, detail), wanted)


def test_not_found_in_every_form_is_gone() -> None:
    assert already_done(sdk.NotFoundError("HTTP response code is 404."), Wanted.GONE)
    found = EngineNotFound(url=URL, what="remove snapshot", object="snapshot s1")
    assert already_done(found, Wanted.GONE)
    assert already_done(sdk.Error("not found", 404), Wanted.GONE)  # empty body, code only


def test_other_errors_are_never_done() -> None:
    down = EngineUnavailable(url=URL, what="finalize", reason="HTTP 503: " + FINISHED)
    assert not already_done(down, Wanted.TRANSFER_ENDED)
    assert not already_done(RuntimeError(FINISHED), Wanted.TRANSFER_ENDED)
    assert not already_done(sdk.Error(FINISHED), Wanted.TRANSFER_ENDED)  # no status at all


async def test_steps_run_independently_and_report_every_failure() -> None:
    async def acted() -> bool:
        return True

    async def already() -> bool:
        return False

    async def fails() -> bool:
        raise mapped(409, "[Cannot remove Snapshot. A disk of it is attached to VM dm.]")

    steps = Steps()
    assert not await steps.run(fails(), "remove snapshot s1", "removed snapshot s1")
    assert await steps.run(acted(), "finalize transfer t1", "finalized transfer t1")
    assert await steps.run(already(), "finalize backup b1", "finalized backup b1")
    assert not await steps.run(fails(), "remove snapshot s2", "removed snapshot s2")
    with pytest.raises(OvirtRecoveryError) as raised:
        steps.result()
    message = str(raised.value)
    assert "2 step(s) failed" in message
    assert "remove snapshot s1: " in message and "remove snapshot s2: " in message
    assert "done: finalized transfer t1" in message
    assert "backup b1" not in message  # already done: neither done nor failed


async def test_steps_with_everything_already_done_report_nothing() -> None:
    async def already() -> bool:
        return False

    steps = Steps()
    await steps.run(already(), "finalize backup b1", "finalized backup b1")
    assert steps.result() == []
