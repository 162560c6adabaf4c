"""Idempotent cleanup: an engine object already in the wanted state is success.

Recovery (``recovery.recover``) may run after a process was
killed anywhere in its own cleanup, and may itself be killed and run again. So every step
asks the engine to reach a state (a transfer ended, a backup finalized, a snapshot, an
attachment, a VM or a disk gone) and treats "it is already there" as done. How the engine
says so is recognised here, in one place (``already_done``), never by string matches spread
over the flows:

=====================  ==========================================================  ========
wanted                 the engine's answer when it already is                      source
=====================  ==========================================================  ========
any                    404 ``NotFoundError`` (never created, removed, purged:       notes
                       backups and transfers 15/30 min after they end)             § 1.3
``TRANSFER_ENDED``     409 ``[Cannot finalize image transfer. Phase is             lab
                       finished_success.]`` (any ``finalizing_*``, ``finished_*``,
                       ``cancelled*`` phase; also on ``cancel``)
``BACKUP_FINALIZED``   400/409 ``[Cannot stop VM Backup. Backup B is already in     notes
                       'succeeded' phase, no need to stop the backup again.]``     § 4.6
                       (also ``finalizing``/``failed``), or ``… is already
                       finalized``
``GONE``               404 only (snapshot removed, disk detached, VM or disk       notes
                       deleted)                                                    § 1.3
=====================  ==========================================================  ========

An imageio ticket is never a step of its own: the engine removes it when the transfer ends
(and imageio's ``DELETE /tickets/{id}`` answers 204 for a missing one, notes § 6.2).

``Steps`` runs recovery steps independently: each one returns whether it changed anything
(``False``: it already was so); a step that fails is recorded and the next one still runs;
``result()`` returns what was done, or raises ``OvirtRecoveryError`` listing every failure
(and what was done before). A second run over the same journal therefore does nothing and
returns ``[]``.
"""

import re
from collections.abc import Awaitable
from enum import Enum
from typing import Final

import ovirtsdk4 as sdk
import structlog

from engine.core.errors import EngineError
from plugins.ovirt.client import EngineApiError, EngineNotFound

log = structlog.get_logger("tessera.ovirt")


class Wanted(Enum):
    """The state a cleanup step wants an engine object in."""

    TRANSFER_ENDED = "transfer ended"
    BACKUP_FINALIZED = "backup finalized"
    GONE = "gone"


_ALREADY: Final[dict[Wanted, re.Pattern[str]]] = {
    Wanted.TRANSFER_ENDED: re.compile(r"\bPhase is (finalizing|finished|cancelled)\w*", re.I),
    Wanted.BACKUP_FINALIZED: re.compile(
        r"already in '?(finalizing|succeeded|failed)'? phase|\bis already finalized", re.I
    ),
}
_REFUSED: Final = frozenset({400, 409})  # validation failures (notes § 1.3); 5xx never counts


def answer(error: BaseException) -> tuple[int | None, str] | None:
    """(HTTP status, fault detail) of an SDK error or of the ``EngineError`` that
    ``EngineClient.call`` made of one; None for anything else."""
    if isinstance(error, EngineNotFound):
        return 404, str(error)
    if isinstance(error, EngineApiError):
        code = error.fields.get("code")
        return code if isinstance(code, int) else None, str(error.fields.get("reason", ""))
    if isinstance(error, sdk.Error):
        if isinstance(error, sdk.NotFoundError):
            return 404, str(error)
        fault = error.fault
        detail = (fault.detail or fault.reason) if fault is not None else None
        return error.code if isinstance(error.code, int) else None, str(detail or error)
    return None


def already_done(error: BaseException, wanted: Wanted) -> bool:
    """Does this refusal say the object already is as ``wanted``?"""
    found = answer(error)
    if found is None:
        return False
    code, detail = found
    if code == 404:
        return True
    pattern = _ALREADY.get(wanted)
    return code in _REFUSED and pattern is not None and pattern.search(detail) is not None


class OvirtRecoveryError(EngineError):
    template = "recovery: {failed} step(s) failed: {reasons}{done}"


class Steps:
    """Recovery steps run one after the other, each independently (module docstring)."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.errors: list[str] = []

    async def run(self, step: Awaitable[bool], what: str, done: str) -> bool:
        """Await ``step`` (``what`` it does: "finalize image transfer T"); ``done``
        ("finalized image transfer T") is reported when it returns True. Returns False when
        it failed (recorded, not raised)."""
        try:
            acted = await step
        except Exception as e:  # noqa: BLE001 - one failed step must not skip the others
            log.warning("recovery step failed", step=what, error=str(e))
            self.errors.append(f"{what}: {e}")
            return False
        if acted:
            self.done.append(done)
        else:
            log.info("recovery step already done", step=what)
        return True

    def merge(self, other: "Steps") -> None:
        self.done += other.done
        self.errors += other.errors

    def result(self) -> list[str]:
        """What was done; raises ``OvirtRecoveryError`` when any step failed."""
        if self.errors:
            done = f" (done: {'; '.join(self.done)})" if self.done else ""
            raise OvirtRecoveryError(
                failed=len(self.errors), reasons="; ".join(self.errors), done=done
            )
        return list(self.done)
