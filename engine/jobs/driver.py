"""Run one job through its state table, persisting every state before acting on it.

A job supplies one coroutine per working state (PREPARING, TRANSFERRING, COMMITTING), each
returning the event that ends it, and one ``cleanup(success)`` coroutine that the cleanup
states run (FINISHING with success=True; ABORTING and CANCELLING with success=False).
Exceptions become the ERROR event (the message is kept on the record, after what the job's
``where(error)`` names, e.g. the disk of a restore that failed); cancellation
becomes CANCEL, cleanup still runs (bounded by ``CLEANUP_TIMEOUT``), and ``CancelledError``
is re-raised once the record says CANCELLED. Each transition is logged as one event.

A transition's journal save runs off the event loop (``Journal``), and the driver waits
until it is durable before acting on the new state, even when the job is cancelled
meanwhile: such a cancellation is kept and handled where the next step would start, as one
that lands in a step.
"""

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import structlog

from engine.core.errors import EngineError, IntegrityError, StoreWriteError
from engine.jobs.journal import JobRecord, Journal
from engine.jobs.states import CLEANUP, TABLES, TERMINAL, Event, State, next_state

CLEANUP_TIMEOUT: Final = 120.0  # seconds; stopping exports and removing bitmaps is quick

Step = Callable[[], Awaitable[Event]]
Cleanup = Callable[[bool], Awaitable[None]]

log = structlog.get_logger("tessera.jobs")


def describe(error: BaseException) -> str:
    if isinstance(error, EngineError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class JobDriver:
    """``where(error)``, when given, names the object a step's failure belongs to (or
    None): the record's error then starts with it."""

    def __init__(
        self,
        journal: Journal,
        record: JobRecord,
        where: Callable[[BaseException], str | None] | None = None,
    ):
        self.journal = journal
        self.record = record
        self._where = where
        self._table = TABLES[record.kind]
        self._cancelled = False  # a cancellation arrived: CANCEL instead of the next step

    async def transition(self, event: Event) -> State:
        record = self.record
        new = next_state(self._table, record.state, event, record.job_id)
        log.debug(
            "job.transition",
            job=record.job_id,
            frm=record.state.value,
            on=event.value,
            to=new.value,
        )
        record.state = new
        record.history.append(f"{record.updated} {new.value}")
        try:
            await self._persist()
        except StoreWriteError as e:
            if new not in CLEANUP and new not in TERMINAL:
                raise  # never act on a state the journal does not hold
            # Undoing what the job made must happen even when the journal cannot say so (a
            # full disk): a killed process leaves the older state, and recovery repeats the
            # cleanup, which is idempotent.
            record.warnings.append(f"journal not saved at {new.value}: {e}")
            log.warning("job.journal_failed", job=record.job_id, state=new.value, error=str(e))
        return new

    async def _persist(self) -> None:
        """Save the record and wait until it is durable, even through a cancellation of
        the job (kept in ``_cancelled``): a state is never acted on unsaved. Raises
        ``StoreWriteError`` as ``Journal.save``."""
        saved = self.journal.queue_save(self.record)
        while not saved.done():
            try:
                await asyncio.shield(saved)
            except asyncio.CancelledError:
                if saved.cancelled():
                    raise
                self._cancelled = True
        saved.result()

    async def _advance(self, event: Event) -> State:
        """``transition``, turning a journal that cannot record a working state into the
        job's error (then cleanup runs, as for any failure)."""
        try:
            return await self.transition(event)
        except StoreWriteError as e:
            self.record.error = describe(e)
            log.warning("job.error", job=self.record.job_id, error=self.record.error)
            return await self.transition(Event.ERROR)

    async def run(self, steps: Mapping[State, Step], cleanup: Cleanup) -> JobRecord:
        state = await self._advance(Event.START)
        while state not in TERMINAL:
            if state in CLEANUP:
                event = await self._cleanup(cleanup, success=state is State.FINISHING)
            elif self._cancelled:  # it came while the state was being saved
                event = Event.CANCEL
            else:
                try:
                    event = await steps[state]()
                except asyncio.CancelledError:
                    self._cancelled = True
                    event = Event.CANCEL
                except Exception as e:  # noqa: BLE001 - the job boundary: any failure is ERROR
                    place = self._where(e) if self._where is not None else None
                    self.record.error = f"{place}: {describe(e)}" if place else describe(e)
                    self.record.integrity = isinstance(e, IntegrityError)
                    log.warning(
                        "job.error",
                        job=self.record.job_id,
                        state=state.value,
                        error=self.record.error,
                    )
                    event = Event.ERROR
            state = await self._advance(event)
        if self._cancelled:
            raise asyncio.CancelledError
        return self.record

    async def _cleanup(self, cleanup: Cleanup, success: bool) -> Event:
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                # Shielded: a second cancellation must not interrupt undoing what was made.
                await asyncio.shield(cleanup(success))
        except Exception as e:  # noqa: BLE001 - a failed cleanup is recorded, not raised
            self.record.warnings.append(f"cleanup: {describe(e)}")
            return Event.ERROR
        except asyncio.CancelledError:
            self.record.warnings.append("cleanup interrupted by cancellation")
            return Event.CANCEL
        return Event.CLEANED
