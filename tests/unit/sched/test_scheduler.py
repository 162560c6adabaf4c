"""The scheduler on a fake clock: fires, no overlap, misfires after downtime, state file."""

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.core.errors import ConfigError
from engine.sched.calendar import Calendar, parse
from engine.sched.clock import FakeClock
from engine.sched.scheduler import Scheduler

T0 = datetime(2025, 1, 10, 0, 0, tzinfo=UTC)  # a Friday


@dataclass(frozen=True)
class Pol:
    name: str
    schedule: tuple[str, ...]

    @property
    def calendars(self) -> Sequence[Calendar]:
        return tuple(parse(s) for s in self.schedule)


@dataclass
class Runner:
    """A fake job runner: each run lasts ``duration`` of virtual time (or raises)."""

    clock: FakeClock
    duration: timedelta = timedelta(minutes=5)
    fail: bool = False
    started: list[tuple[str, datetime, datetime]] = field(default_factory=list)

    async def __call__(self, policy: Pol, planned: datetime) -> None:
        self.started.append((policy.name, planned, self.clock.now()))
        await self.clock.sleep_until(self.clock.now() + self.duration)
        if self.fail:
            raise RuntimeError("engine said no")


@asynccontextmanager
async def running(scheduler: Scheduler[Pol]) -> AsyncIterator[None]:
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0)
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def make(
    clock: FakeClock, runner: Runner, *policies: Pol, state: Path | None = None, **kw: object
) -> Scheduler[Pol]:
    return Scheduler(policies, runner, clock=clock, tz=UTC, state_file=state, **kw)  # type: ignore[arg-type]


def h(hours: float) -> timedelta:
    return timedelta(hours=hours)


async def test_fires_at_each_planned_time_and_shows_next_runs() -> None:
    clock = FakeClock(T0)
    runner = Runner(clock)
    sched = make(clock, runner, Pol("nightly", ("daily 02:00",)), Pol("often", ("*:0/30",)))
    assert sched.next_runs() == {"nightly": T0 + h(2), "often": T0 + h(0.5)}
    async with running(sched):
        await clock.advance(h(3))
        assert sorted((p, n) for n, p, _ in runner.started) == [
            (T0 + h(0.5), "often"),
            (T0 + h(1), "often"),
            (T0 + h(1.5), "often"),
            (T0 + h(2), "nightly"),
            (T0 + h(2), "often"),
            (T0 + h(2.5), "often"),
            (T0 + h(3), "often"),
        ]
        assert all(planned == at for _, planned, at in runner.started)
        assert sched.next_runs() == {
            "nightly": T0 + timedelta(days=1, hours=2),
            "often": T0 + h(3.5),
        }
        status = {s.name: s for s in sched.status()}
        assert status["often"].running == T0 + h(3)
        assert status["nightly"].last_started == T0 + h(2)
        await clock.advance(h(1))
        finished = [e for e in sched.events if e.outcome == "finished" and e.policy == "nightly"]
        assert [e.at for e in finished] == [T0 + h(2) + timedelta(minutes=5)]


async def test_a_run_still_going_makes_the_next_fire_skip() -> None:
    clock = FakeClock(T0)
    runner = Runner(clock, duration=timedelta(minutes=70))
    sched = make(clock, runner, Pol("p", ("hourly",)))
    async with running(sched):
        await clock.advance(h(3) + timedelta(minutes=30))
    assert [p for _, p, _ in runner.started] == [T0 + h(1), T0 + h(3)]
    skipped = [e for e in sched.events if e.outcome == "skipped"]
    assert [(e.planned, e.reason) for e in skipped] == [
        (T0 + h(2), f"the run planned for {(T0 + h(1)).isoformat()} is still going")
    ]


async def test_a_failed_run_is_recorded_and_the_schedule_goes_on() -> None:
    clock = FakeClock(T0)
    runner = Runner(clock, fail=True)
    sched = make(clock, runner, Pol("p", ("hourly",)))
    async with running(sched):
        await clock.advance(h(2) + timedelta(minutes=10))
    failed = [e for e in sched.events if e.outcome == "failed"]
    assert [(e.planned, e.reason) for e in failed] == [
        (T0 + h(1), "RuntimeError: engine said no"),
        (T0 + h(2), "RuntimeError: engine said no"),
    ]


async def test_downtime_within_grace_gives_one_catch_up_run(tmp_path: Path) -> None:
    state = tmp_path / "scheduler.json"
    clock = FakeClock(T0)
    runner = Runner(clock)
    pol = Pol("p", ("*:0/15",))
    async with running(make(clock, runner, pol, state=state)):
        await clock.advance(timedelta(minutes=20))  # fires 00:15
    clock.jump(timedelta(minutes=40))  # stopped at 00:20, started again at 01:00
    runner.started.clear()
    sched = make(clock, runner, pol, state=state)
    assert sched.next_runs() == {"p": T0 + timedelta(minutes=30)}  # in the past: a misfire
    async with running(sched):
        await clock.advance(timedelta(minutes=1))
    # 00:30, 00:45 and 01:00 were due: one run, for the latest, at once.
    assert [(p, at) for _, p, at in runner.started] == [(T0 + h(1), T0 + h(1))]
    started = [e for e in sched.events if e.outcome == "started"]
    assert started[0].reason == (
        f"catch-up run; missed fire times from {(T0 + timedelta(minutes=30)).isoformat()} coalesced"
    )
    assert sched.next_runs() == {"p": T0 + h(1.25)}


async def test_downtime_beyond_grace_skips_to_the_next_fire(tmp_path: Path) -> None:
    state = tmp_path / "scheduler.json"
    clock = FakeClock(T0)
    runner = Runner(clock)
    pol = Pol("nightly", ("daily 02:00",))
    async with running(make(clock, runner, pol, state=state)):
        await clock.advance(h(3))  # ran at 02:00 on the 10th
    clock.jump(timedelta(days=1, hours=2))  # down until 05:00 on the 11th: 02:00 missed by 3 h
    runner.started.clear()
    sched = make(clock, runner, pol, state=state)
    async with running(sched):
        await clock.advance(h(1))
        assert runner.started == []
        skipped = [e for e in sched.events if e.outcome == "skipped"]
        assert [(e.planned, e.reason) for e in skipped] == [
            (T0 + timedelta(days=1, hours=2), "missed by 3h, beyond the misfire grace of 1h")
        ]
        assert sched.next_runs() == {"nightly": T0 + timedelta(days=2, hours=2)}
        await clock.advance(timedelta(days=1))
    assert [p for _, p, _ in runner.started] == [T0 + timedelta(days=2, hours=2)]


async def test_grace_is_configurable_and_a_long_downtime_is_not_enumerated(tmp_path: Path) -> None:
    state = tmp_path / "scheduler.json"
    clock = FakeClock(T0)
    runner = Runner(clock, duration=timedelta(seconds=1))
    pol = Pol("m", ("minutely",))
    async with running(make(clock, runner, pol, state=state)):
        await clock.advance(timedelta(minutes=1, seconds=30))
    clock.jump(timedelta(days=3650))  # ten years of minutes missed
    runner.started.clear()
    sched = make(clock, runner, pol, state=state, misfire_grace=timedelta(minutes=5))
    async with running(sched):
        await clock.advance(timedelta(seconds=1))
    # the latest minute within the 5 minutes of grace runs once
    now = T0 + timedelta(days=3650, minutes=1, seconds=30)
    assert [p for _, p, _ in runner.started] == [now.replace(second=0)]


async def test_without_state_there_is_no_catch_up() -> None:
    clock = FakeClock(T0 + h(2) + timedelta(minutes=1))
    runner = Runner(clock)
    sched = make(clock, runner, Pol("nightly", ("daily 02:00",)))
    assert sched.next_runs() == {"nightly": T0 + timedelta(days=1, hours=2)}


async def test_state_file_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    state = tmp_path / "scheduler.json"
    clock = FakeClock(T0)
    runner = Runner(clock, duration=h(2))
    async with running(make(clock, runner, Pol("p", ("hourly",)), state=state)):
        await clock.advance(h(2) + timedelta(minutes=1))  # 01:00 started, 02:00 skipped
    doc = json.loads(state.read_text())
    assert doc == {
        "version": 1,
        "policies": {
            "p": {"last_fire": (T0 + h(2)).isoformat(), "last_started": (T0 + h(1)).isoformat()}
        },
    }
    assert not list(tmp_path.glob("*.tmp"))
    statuses = make(clock, runner, Pol("p", ("hourly",)), state=state).status()
    assert statuses[0].last_started == T0 + h(1)
    state.write_text("{not json")
    with pytest.raises(ConfigError, match=r"scheduler\.json: unreadable scheduler state"):
        make(clock, runner, Pol("p", ("hourly",)), state=state)


async def test_trigger_runs_now_under_the_overlap_rule() -> None:
    clock = FakeClock(T0)
    runner = Runner(clock, duration=h(1))
    sched = make(clock, runner, Pol("p", ("daily 02:00",)))
    with pytest.raises(RuntimeError, match="not running"):
        await sched.trigger("p")
    async with running(sched):
        first = await sched.trigger("p")
        second = await sched.trigger("p")
    assert (first.outcome, first.reason) == ("started", "started by hand")
    assert second.outcome == "skipped"
    assert [p for _, p, _ in runner.started] == [T0]


async def test_schedule_in_a_zone_across_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2025, 3, 29, 12, 0, tzinfo=berlin)
    clock = FakeClock(start)
    runner = Runner(clock)
    sched = Scheduler([Pol("p", ("daily 02:30",))], runner, clock=clock, tz=berlin, state_file=None)
    async with running(sched):
        await clock.advance(timedelta(days=2))
    assert [p.astimezone(berlin).isoformat() for _, p, _ in runner.started] == [
        "2025-03-30T03:00:00+02:00",  # 02:30 did not exist: the end of the gap
        "2025-03-31T02:30:00+02:00",
    ]


async def test_hourly_and_daily_across_the_fall_back_in_a_zone() -> None:
    """Berlin repeats 02:00-02:59 on 2025-10-26: the hourly policy runs every elapsed hour
    (02:00 twice), the daily one once."""
    berlin = ZoneInfo("Europe/Berlin")
    clock = FakeClock(datetime(2025, 10, 26, 0, 30, tzinfo=berlin))
    runner = Runner(clock)
    pols = [Pol("hourly", ("hourly",)), Pol("daily", ("daily 02:30",))]
    sched = Scheduler(pols, runner, clock=clock, tz=berlin, state_file=None)
    async with running(sched):
        await clock.advance(timedelta(hours=5))
    runs = [(n, p.astimezone(berlin).isoformat()) for n, p, _ in runner.started]
    assert [p for n, p in runs if n == "hourly"] == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T02:00:00+01:00",
        "2025-10-26T03:00:00+01:00",
        "2025-10-26T04:00:00+01:00",
    ]
    assert [p for n, p in runs if n == "daily"] == ["2025-10-26T02:30:00+02:00"]


async def test_no_schedule_means_no_runs_and_names_are_unique() -> None:
    clock = FakeClock(T0)
    runner = Runner(clock)
    sched = make(clock, runner, Pol("manual", ()))
    assert sched.next_runs() == {"manual": None}
    async with running(sched):
        await clock.advance(timedelta(days=30))
    assert runner.started == []
    with pytest.raises(ValueError, match="two policies named 'a'"):
        make(clock, runner, Pol("a", ()), Pol("a", ()))


async def test_replace_changes_schedules_and_lets_a_running_run_finish() -> None:
    """A reload: a changed calendar takes effect at once, a new policy starts its schedule, a
    removed one stops firing; the run in progress (its policy changed) goes on to its end and
    the changed policy's next fire during that run is still skipped (no overlap)."""
    clock = FakeClock(T0)
    runner = Runner(clock, duration=timedelta(minutes=50))
    sched = make(clock, runner, Pol("p", ("hourly",)), Pol("gone", ("*:0/20",)))
    async with running(sched):
        await clock.advance(h(1) + timedelta(minutes=10))  # p runs since 01:00
        added, changed, removed = sched.replace(
            [Pol("p", ("*:0/15",)), Pol("new", ("daily 02:00",))]
        )
        assert (added, changed, removed) == (["new"], ["p"], ["gone"])
        assert sched.next_runs() == {"new": T0 + h(2), "p": T0 + h(1.25)}
        await clock.advance(h(1))  # to 02:10
    starts = [(name, planned) for name, planned, _ in runner.started]
    # gone's 00:20 run lasted past 00:40 and 01:00 (skipped); nothing fired after the reload
    assert [p for n, p in starts if n == "gone"] == [T0 + timedelta(minutes=20)]
    assert [p for n, p in starts if n == "p"] == [T0 + h(1), T0 + h(2)]
    assert [p for n, p in starts if n == "new"] == [T0 + h(2)]
    skipped = [(e.policy, e.planned) for e in sched.events if e.outcome == "skipped"]
    assert [p for n, p in skipped if n == "p"] == [T0 + h(1.25), T0 + h(1.5), T0 + h(1.75)]
    finished = [e for e in sched.events if e.outcome == "finished" and e.policy == "p"]
    assert finished[0].planned == T0 + h(1)  # the run that was going when the reload came


def test_replace_refuses_two_policies_of_one_name_and_changes_nothing() -> None:
    clock = FakeClock(T0)
    sched = make(clock, Runner(clock), Pol("p", ("hourly",)))
    with pytest.raises(ValueError, match="two policies named 'p'"):
        sched.replace([Pol("p", ("daily",)), Pol("p", ("hourly",))])
    assert sched.next_runs() == {"p": T0 + h(1)}
