"""State tables: every (state, event) pair is enumerated and checked."""

import itertools

import pytest

from engine.jobs.states import (
    BACKUP,
    CLEANUP,
    RESTORE,
    TERMINAL,
    Event,
    IllegalTransition,
    State,
    Table,
    next_state,
)

S, E = State, Event
WORKING = (S.PREPARING, S.TRANSFERRING, S.COMMITTING)

EXPECTED: dict[tuple[State, Event], State] = {
    (S.PENDING, E.START): S.PREPARING,
    (S.PENDING, E.CANCEL): S.CANCELLED,
    (S.PREPARING, E.PREPARED): S.TRANSFERRING,
    (S.TRANSFERRING, E.TRANSFERRED): S.COMMITTING,
    (S.COMMITTING, E.COMMITTED): S.FINISHING,
    **{(w, E.ERROR): S.ABORTING for w in WORKING},
    **{(w, E.CANCEL): S.CANCELLING for w in WORKING},
    **{(S.FINISHING, e): S.SUCCEEDED for e in (E.CLEANED, E.ERROR, E.CANCEL)},
    **{(S.ABORTING, e): S.FAILED for e in (E.CLEANED, E.ERROR, E.CANCEL)},
    **{(S.CANCELLING, e): S.CANCELLED for e in (E.CLEANED, E.ERROR, E.CANCEL)},
}


@pytest.mark.parametrize("table", [BACKUP, RESTORE], ids=["backup", "restore"])
@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_pair(table: Table, state: State, event: Event) -> None:
    expected = EXPECTED.get((state, event))
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"from {state.value} on {event.value}"):
            next_state(table, state, event, "job-1")
    else:
        assert next_state(table, state, event) is expected


def test_terminal_states_have_no_way_out() -> None:
    for table in (BACKUP, RESTORE):
        assert not [k for k in table if k[0] in TERMINAL]


def test_every_failure_path_reaches_a_cleanup_state() -> None:
    for table in (BACKUP, RESTORE):
        for working in WORKING:
            for event in (E.ERROR, E.CANCEL):
                assert table[(working, event)] in CLEANUP


def test_every_state_reachable_and_every_path_terminates() -> None:
    for table in (BACKUP, RESTORE):
        seen, frontier = {S.PENDING}, [S.PENDING]
        while frontier:
            state = frontier.pop()
            for (src, _event), dst in table.items():
                if src is state and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert seen == set(State)
