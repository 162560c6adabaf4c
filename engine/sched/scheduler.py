"""The scheduler: turns each policy's calendar expressions into runs.

::

    per policy:  next = next fire after (last fire in the state file | now)
                 sleep_until(next) ──► due fire times ≤ now?
                     none within the grace window ──► skipped "missed … beyond the grace"
                     some (downtime, a late wake) ──► the latest one runs, the others are
                                                      coalesced into it (one catch-up run)
                 run still going?  ──► skipped "still running" (no overlapping runs)
                 else              ──► state file records the fire, then start(policy, planned)

``start`` is the job runner's coroutine: it returns when the run has finished. Runs live in
the scheduler's TaskGroup; a run that raises is recorded as failed and the schedule goes
on; cancelling ``run()`` cancels the runs. Every outcome is an ``Event`` kept in a bounded
history and passed to ``on_event`` (the daemon logs it). Times are aware; fire times are
computed in ``tz`` (wall-clock rules, see ``engine.sched.calendar``) and reported in UTC.
"""

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from engine.sched.calendar import Calendar, next_after
from engine.sched.clock import Clock
from engine.sched.state import ScheduleState

DEFAULT_MISFIRE_GRACE = timedelta(hours=1)
HISTORY = 1000  # events kept for the API; older ones are in the log


class Scheduled(Protocol):
    """What the scheduler needs of a policy (``engine.config.policy.Policy`` has it)."""

    @property
    def name(self) -> str: ...

    @property
    def calendars(self) -> Sequence[Calendar]: ...


P = TypeVar("P", bound=Scheduled)
Outcome = Literal["started", "skipped", "finished", "failed"]


@dataclass(frozen=True, slots=True)
class Event:
    policy: str
    planned: datetime  # the fire time (UTC)
    at: datetime  # when it happened (UTC)
    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    name: str
    next_run: datetime | None  # None: no schedule, or it has no future times
    running: datetime | None  # planned time of the run in progress
    last_fire: datetime | None
    last_started: datetime | None


@dataclass
class _Entry(Generic[P]):
    policy: P
    next_run: datetime | None = None
    running: datetime | None = None
    loop: "asyncio.Task[None] | None" = None  # its schedule, while the scheduler runs


class Scheduler(Generic[P]):
    def __init__(
        self,
        policies: Iterable[P],
        start: Callable[[P, datetime], Awaitable[object]],
        *,
        clock: Clock,
        tz: tzinfo,
        state_file: Path | None = None,
        misfire_grace: timedelta = DEFAULT_MISFIRE_GRACE,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        """Raises ConfigError if ``state_file`` exists but cannot be read, ValueError on
        two policies with one name."""
        self._entries: dict[str, _Entry[P]] = {}
        for policy in policies:
            if policy.name in self._entries:
                raise ValueError(f"two policies named {policy.name!r}")
            self._entries[policy.name] = _Entry(policy)
        self._start = start
        self._clock = clock
        self._tz = tz
        self._grace = misfire_grace
        self._on_event = on_event
        self._state = ScheduleState(state_file)
        self._events: deque[Event] = deque(maxlen=HISTORY)
        self._group: asyncio.TaskGroup | None = None
        now = clock.now()
        for entry in self._entries.values():
            self._plan(entry, now)

    def _plan(self, entry: _Entry[P], now: datetime) -> None:
        last = self._state.get(entry.policy.name).last_fire
        entry.next_run = self._next(entry, last if last is not None and last < now else now)

    # -- what the API shows -------------------------------------------------------------

    def status(self) -> list[PolicyStatus]:
        return [
            PolicyStatus(
                name,
                e.next_run,
                e.running,
                self._state.get(name).last_fire,
                self._state.get(name).last_started,
            )
            for name, e in sorted(self._entries.items())
        ]

    def next_runs(self) -> dict[str, datetime | None]:
        return {name: e.next_run for name, e in sorted(self._entries.items())}

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Run every policy's schedule until cancelled (then the running jobs are
        cancelled too and awaited)."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                for entry in self._entries.values():
                    self._start_loop(entry)
                await asyncio.Event().wait()  # until cancelled
            finally:
                self._group = None

    def _start_loop(self, entry: _Entry[P]) -> None:
        assert self._group is not None
        name = f"schedule {entry.policy.name}"
        entry.loop = self._group.create_task(self._loop(entry), name=name)

    def replace(self, policies: Iterable[P]) -> tuple[list[str], list[str], list[str]]:
        """New policies (a reload): each schedule restarts from its state-file record under
        the new calendars; a run in progress goes on to its end, whatever happens to its
        policy (a removed policy's run too). Returns
        the names (added, changed, removed). ValueError on two policies with one name, before
        anything changed. A policy that keeps its name keeps its running state, so a fire
        that comes while its run goes on is skipped as before."""
        new: dict[str, P] = {}
        for policy in policies:
            if policy.name in new:
                raise ValueError(f"two policies named {policy.name!r}")
            new[policy.name] = policy
        now = self._clock.now()
        added, changed, removed = [], [], []
        for name in list(self._entries):
            if name not in new:
                removed.append(name)
                gone = self._entries.pop(name)
                if gone.loop is not None:
                    gone.loop.cancel()  # the schedule, never the run (its own task)
        for name, policy in new.items():
            found = self._entries.get(name)
            if found is None:
                added.append(name)
                entry = self._entries[name] = _Entry(policy)
            else:
                entry = found
                if entry.policy != policy:
                    changed.append(name)
                if entry.loop is not None:
                    entry.loop.cancel()
                entry.policy = policy
            self._plan(entry, now)
            if self._group is not None:
                self._start_loop(entry)
        return added, changed, removed

    async def trigger(self, name: str) -> Event:
        """Start a policy now (the API's "run now"), under the same no-overlap rule.
        Raises KeyError for an unknown policy, RuntimeError when not running."""
        entry = self._entries[name]
        return await self._fire(entry, self._clock.now().astimezone(UTC), "started by hand")

    async def _loop(self, entry: _Entry[P]) -> None:
        while entry.next_run is not None:
            planned = entry.next_run
            await self._clock.sleep_until(planned)
            now = self._clock.now().astimezone(UTC)
            if now < planned:
                continue  # woke early
            latest = self._latest_due(entry, planned, now)
            if latest is None:
                why = (
                    f"missed by {_human(now - planned)}, beyond the misfire grace of "
                    f"{_human(self._grace)}"
                )
                self._state.record(entry.policy.name, planned, started=False)
                self._emit(entry, planned, "skipped", why)
                entry.next_run = self._next(entry, now)
                continue
            reason = ""
            if latest != planned:
                reason = f"catch-up run; missed fire times from {planned.isoformat()} coalesced"
            entry.next_run = self._next(entry, max(latest, now))
            await self._fire(entry, latest, reason)

    def _latest_due(self, entry: _Entry[P], first: datetime, now: datetime) -> datetime | None:
        """The latest fire time in ``[first, now]`` that is within the grace window. Fire
        times before the window are not enumerated (a minutely schedule over a long
        downtime is many)."""
        t: datetime | None = first
        if first < now - self._grace:
            t = self._next(entry, now - self._grace - timedelta(microseconds=1))
        latest = None
        while t is not None and t <= now:
            latest, t = t, self._next(entry, t)
        return latest

    async def _fire(self, entry: _Entry[P], planned: datetime, reason: str) -> Event:
        if self._group is None:
            raise RuntimeError("the scheduler is not running")
        name = entry.policy.name
        if entry.running is not None:
            self._state.record(name, planned, started=False)
            why = f"the run planned for {entry.running.isoformat()} is still going"
            return self._emit(entry, planned, "skipped", why)
        self._state.record(name, planned, started=True)  # durable before acting
        entry.running = planned
        event = self._emit(entry, planned, "started", reason)
        self._group.create_task(self._run(entry, planned), name=f"run {name} {planned}")
        return event

    async def _run(self, entry: _Entry[P], planned: datetime) -> None:
        try:
            await self._start(entry.policy, planned)
        except Exception as e:  # noqa: BLE001 - a failed run must not stop the schedule
            self._emit(entry, planned, "failed", f"{type(e).__name__}: {e}")
        else:
            self._emit(entry, planned, "finished")
        finally:
            entry.running = None

    def _next(self, entry: _Entry[P], after: datetime) -> datetime | None:
        t = next_after(entry.policy.calendars, after.astimezone(UTC), self._tz)
        return t.astimezone(UTC) if t is not None else None

    def _emit(
        self, entry: _Entry[P], planned: datetime, outcome: Outcome, reason: str = ""
    ) -> Event:
        event = Event(
            entry.policy.name, planned, self._clock.now().astimezone(UTC), outcome, reason
        )
        self._events.append(event)
        if self._on_event is not None:
            self._on_event(event)
        return event


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds % 86400 == 0 and seconds:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0 and seconds:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds:
        return f"{seconds // 60}m"
    return f"{seconds}s"
