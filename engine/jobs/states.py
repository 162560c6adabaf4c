"""The job state tables (h11 style: the only place transitions are defined).

::

    PENDING ──start──▶ PREPARING ──prepared──▶ TRANSFERRING ──transferred──▶ COMMITTING
       │                   │                        │                           │
     cancel          error │ cancel           error │ cancel              error │ cancel │ committed
       ▼                   ▼                        ▼                           ▼        ▼
    CANCELLED        ABORTING / CANCELLING  (cleanup: undo what was created)   FINISHING
                           │ cleaned | error                                    │ cleaned | error
                           ▼                                                    ▼
                     FAILED / CANCELLED                                     SUCCEEDED

Backup: PREPARING opens the source (exports, checkpoints), TRANSFERRING reads disks into the
store, COMMITTING writes the manifest, FINISHING drops what the run no longer needs.
Restore: PREPARING share-locks the snapshot and chooses its disks, TRANSFERRING creates,
writes and publishes each target disk in turn, COMMITTING runs the caller's finish (create
the VM, attach the disks); targets clean up after themselves, so its cleanup states have
nothing left to do. A cleanup error after a commit does not undo the commit: the job still
SUCCEEDED, with the error kept as a warning.
"""

from collections.abc import Mapping
from enum import StrEnum

from engine.core.errors import EngineError


class State(StrEnum):
    PENDING = "pending"
    PREPARING = "preparing"
    TRANSFERRING = "transferring"
    COMMITTING = "committing"
    FINISHING = "finishing"
    ABORTING = "aborting"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Event(StrEnum):
    START = "start"
    PREPARED = "prepared"
    TRANSFERRED = "transferred"
    COMMITTED = "committed"
    CLEANED = "cleaned"
    ERROR = "error"
    CANCEL = "cancel"


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})
CLEANUP = frozenset({State.FINISHING, State.ABORTING, State.CANCELLING})
Table = Mapping[tuple[State, Event], State]


def _lifecycle() -> dict[tuple[State, Event], State]:
    s, e = State, Event
    table = {
        (s.PENDING, e.START): s.PREPARING,
        (s.PENDING, e.CANCEL): s.CANCELLED,
        (s.PREPARING, e.PREPARED): s.TRANSFERRING,
        (s.TRANSFERRING, e.TRANSFERRED): s.COMMITTING,
        (s.COMMITTING, e.COMMITTED): s.FINISHING,
        (s.FINISHING, e.CLEANED): s.SUCCEEDED,
        (s.FINISHING, e.ERROR): s.SUCCEEDED,
        (s.FINISHING, e.CANCEL): s.SUCCEEDED,
        (s.ABORTING, e.CLEANED): s.FAILED,
        (s.ABORTING, e.ERROR): s.FAILED,
        (s.ABORTING, e.CANCEL): s.FAILED,
        (s.CANCELLING, e.CLEANED): s.CANCELLED,
        (s.CANCELLING, e.ERROR): s.CANCELLED,
        (s.CANCELLING, e.CANCEL): s.CANCELLED,
    }
    for working in (s.PREPARING, s.TRANSFERRING, s.COMMITTING):
        table[(working, e.ERROR)] = s.ABORTING
        table[(working, e.CANCEL)] = s.CANCELLING
    return table


BACKUP: Table = _lifecycle()
RESTORE: Table = _lifecycle()
REPLICATE: Table = _lifecycle()  # engine.replication.job: open session, send, commit
STANDBY: Table = _lifecycle()  # engine.standby.job: a restore (full or refresh) of a standby
TABLES: Mapping[str, Table] = {
    "backup": BACKUP,
    "restore": RESTORE,
    "replicate": REPLICATE,
    "standby": STANDBY,
}


class IllegalTransition(EngineError):
    template = "job {job}: no transition from {state} on {event}"


def next_state(table: Table, state: State, event: Event, job: str = "?") -> State:
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(job=job, state=state.value, event=event.value) from None
