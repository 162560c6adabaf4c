"""Calendar expressions: a table of next-run times, the DST rules, errors, and properties."""

import functools
import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.core.errors import ConfigError
from engine.sched.calendar import Calendar, parse

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, tz: ZoneInfo = BERLIN) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def nxt(expr: str, after: str, tz: ZoneInfo = BERLIN) -> str:
    result = parse(expr).next_after(at(after, tz), tz)
    assert result is not None
    return result.isoformat()


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        # shortcuts, with and without a time
        ("hourly", "2025-01-10 10:00:00", "2025-01-10T11:00:00+01:00"),
        ("hourly", "2025-01-10 10:59:59.5", "2025-01-10T11:00:00+01:00"),
        ("daily", "2025-01-10 10:00", "2025-01-11T00:00:00+01:00"),
        ("daily 02:00", "2025-01-10 01:59", "2025-01-10T02:00:00+01:00"),
        ("daily 02:00", "2025-01-10 02:00", "2025-01-11T02:00:00+01:00"),
        ("weekly", "2025-01-10 10:00", "2025-01-13T00:00:00+01:00"),  # a Monday
        ("weekly 03:30", "2025-01-13 03:29", "2025-01-13T03:30:00+01:00"),
        ("monthly", "2025-01-31 10:00", "2025-02-01T00:00:00+01:00"),
        ("yearly", "2025-06-01 00:00", "2026-01-01T00:00:00+01:00"),
        ("quarterly", "2025-04-01 00:00", "2025-07-01T00:00:00+02:00"),
        ("minutely", "2025-01-10 10:00:30", "2025-01-10T10:01:00+01:00"),
        # weekdays: lists, ranges, wrap-around, the old dash form
        ("mon..fri 22:30", "2025-01-10 22:30", "2025-01-13T22:30:00+01:00"),  # Fri → Mon
        ("mon..fri 22:30", "2025-01-09 23:00", "2025-01-10T22:30:00+01:00"),
        ("sat,sun 04:00", "2025-01-10 12:00", "2025-01-11T04:00:00+01:00"),
        ("sat,sun 04:00", "2025-01-11 04:00", "2025-01-12T04:00:00+01:00"),
        ("fri..mon 01:00", "2025-01-13 02:00", "2025-01-17T01:00:00+01:00"),
        ("Mon-Wed 05:00", "2025-01-15 06:00", "2025-01-20T05:00:00+01:00"),
        # dates: month ends, Feb 29, year wrap, lists, steps, explicit years
        ("*-*-01 03:00", "2025-01-31 12:00", "2025-02-01T03:00:00+01:00"),
        ("*-*-31", "2025-04-01 00:00", "2025-05-31T00:00:00+02:00"),  # April has 30 days
        ("*-02-29 12:00", "2025-01-01 00:00", "2028-02-29T12:00:00+01:00"),
        ("*-02-29", "2097-03-01 00:00", "2104-02-29T00:00:00+01:00"),  # 2100 is no leap year
        ("12-31 23:59:59", "2025-12-31 23:59:59", "2026-12-31T23:59:59+01:00"),
        ("*-*-01,15 06:00", "2025-01-02 00:00", "2025-01-15T06:00:00+01:00"),
        ("*-*-1..7 08:00", "2025-01-07 09:00", "2025-02-01T08:00:00+01:00"),
        ("*-1/3-01", "2025-02-01 00:00", "2025-04-01T00:00:00+02:00"),
        ("sun *-*-1..7 04:00", "2025-01-01 00:00", "2025-01-05T04:00:00+01:00"),  # 1st Sunday
        ("2027-06-01", "2025-01-01 00:00", "2027-06-01T00:00:00+02:00"),
        ("*:0/15", "2025-01-10 10:07", "2025-01-10T10:15:00+01:00"),
        ("*:*:30", "2025-01-10 10:07:31", "2025-01-10T10:08:30+01:00"),
        ("08..18:00", "2025-01-10 18:00", "2025-01-11T08:00:00+01:00"),
        # cron
        ("30 2 * * 1-5", "2025-01-10 03:00", "2025-01-13T02:30:00+01:00"),
        ("*/20 * * * *", "2025-01-10 10:41", "2025-01-10T11:00:00+01:00"),
        ("0 9-17/4 * * *", "2025-01-10 13:00", "2025-01-10T17:00:00+01:00"),
        ("0 0 1,15 * *", "2025-01-02 00:00", "2025-01-15T00:00:00+01:00"),
        ("0 4 * jan,jul sun", "2025-01-27 00:00", "2025-07-06T04:00:00+02:00"),
        ("0 0 * * 7", "2025-01-10 00:00", "2025-01-12T00:00:00+01:00"),  # 7 is Sunday
        ("0 0 29 2 *", "2024-03-01 00:00", "2028-02-29T00:00:00+01:00"),
        ("0 0 31 * *", "2025-01-31 00:00", "2025-03-31T00:00:00+02:00"),
        ("0 0 13 * fri", "2025-01-01 00:00", "2025-01-03T00:00:00+01:00"),  # either day
        ("0 0 13 * *", "2025-01-01 00:00", "2025-01-13T00:00:00+01:00"),
        ("59 23 31 12 *", "2025-12-31 23:59", "2026-12-31T23:59:00+01:00"),
        ("@daily", "2025-01-10 10:00", "2025-01-11T00:00:00+01:00"),
        ("@weekly", "2025-01-10 10:00", "2025-01-12T00:00:00+01:00"),
        # DST, Europe/Berlin: 2025-03-30 02:00 → 03:00, 2025-10-26 03:00 → 02:00
        ("daily 02:30", "2025-03-29 12:00", "2025-03-30T03:00:00+02:00"),  # gap: end of gap
        ("daily 02:30", "2025-03-30 03:00", "2025-03-31T02:30:00+02:00"),
        ("*:0/15", "2025-03-30 01:50", "2025-03-30T03:00:00+02:00"),
        ("*:0/15", "2025-03-30 03:00", "2025-03-30T03:15:00+02:00"),  # the gap fired once
        ("daily 03:00", "2025-03-29 12:00", "2025-03-30T03:00:00+02:00"),
        ("daily 02:30", "2025-10-25 12:00", "2025-10-26T02:30:00+02:00"),  # first occurrence
        ("30 2 * * *", "2025-03-29 12:00", "2025-03-30T03:00:00+02:00"),
        ("0 1-3 * * *", "2025-03-30 01:30", "2025-03-30T03:00:00+02:00"),  # 02:00 and 03:00
        # rhythms (every hour matches) follow elapsed time: a gap's times are skipped ...
        ("*:05", "2025-03-30 01:05", "2025-03-30T03:05:00+02:00"),
        ("30 * * * *", "2025-03-30 01:30", "2025-03-30T03:30:00+02:00"),
        # ... and a fold's times fire at both occurrences (see the test below)
        ("hourly", "2025-10-26 02:00", "2025-10-26T02:00:00+01:00"),
        ("*:0/15", "2025-10-26 02:50", "2025-10-26T02:00:00+01:00"),
    ],
)
def test_next_after(expr: str, after: str, expected: str) -> None:
    assert nxt(expr, after) == expected


def test_fold_fires_a_rhythm_every_elapsed_hour() -> None:
    """Europe/Berlin repeats 02:00-02:59 on 2025-10-26 (00:00-01:00 UTC at +02:00, then
    01:00-02:00 UTC at +01:00): hourly keeps one hour between runs."""
    cal = parse("hourly")
    t = datetime(2025, 10, 25, 22, 30, tzinfo=UTC)
    runs = []
    for _ in range(5):
        found = cal.next_after(t, BERLIN)
        assert found is not None
        runs.append(found.isoformat())
        t = found
    assert runs == [
        "2025-10-26T01:00:00+02:00",
        "2025-10-26T02:00:00+02:00",
        "2025-10-26T02:00:00+01:00",
        "2025-10-26T03:00:00+01:00",
        "2025-10-26T04:00:00+01:00",
    ]


def test_every_hour_tells_rhythms_from_times_of_day() -> None:
    assert [parse(e).every_hour for e in ("hourly", "*:0/15", "@hourly", "5 * * * 1")] == [True] * 4
    assert not any(parse(e).every_hour for e in ("daily", "08..18:00", "0 */2 * * *"))


def test_ambiguous_hour_fires_once() -> None:
    cal = parse("daily 02:30")
    first = cal.next_after(at("2025-10-26 00:00"))
    assert first is not None
    assert first.isoformat() == "2025-10-26T02:30:00+02:00"
    # From inside the repeated hour (second pass, +01:00) the next run is the next day.
    second_pass = datetime(2025, 10, 26, 1, 10, tzinfo=UTC)  # 02:10 CET
    again = cal.next_after(second_pass, BERLIN)
    assert again is not None
    assert again.isoformat() == "2025-10-27T02:30:00+01:00"


def test_zone_defaults_to_the_datetime_zone_and_result_is_in_it() -> None:
    utc_result = parse("daily 02:00").next_after(datetime(2025, 1, 10, 3, tzinfo=UTC))
    assert utc_result == datetime(2025, 1, 11, 2, tzinfo=UTC)
    berlin = parse("daily 02:00").next_after(datetime(2025, 1, 10, 3, tzinfo=UTC), BERLIN)
    assert berlin is not None
    assert berlin.isoformat() == "2025-01-11T02:00:00+01:00"


def test_exhausted_year_list_gives_none_and_naive_is_refused() -> None:
    assert parse("2026-01-01").next_after(at("2026-01-01 00:00")) is None
    with pytest.raises(ValueError, match="aware"):
        parse("daily").next_after(datetime(2025, 1, 1))


def test_next_after_of_several_takes_the_earliest() -> None:
    from engine.sched.calendar import next_after

    exprs = [parse("daily 23:00"), parse("sat 01:00")]
    assert next_after(exprs, at("2025-01-10 23:30")) == at("2025-01-11 01:00")
    assert next_after("hourly", at("2025-01-10 23:30")) == at("2025-01-11 00:00")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "schedule '': empty calendar expression"),
        ("mon..fry 22:30", "schedule 'mon..fry 22:30': not a weekday: 'fry'"),
        ("daily 25:00", "schedule 'daily 25:00': hour out of range 0..23: '25'"),
        ("daily 02:61", "schedule 'daily 02:61': minute out of range 0..59: '61'"),
        ("daily lunch", "daily may only be followed by a time HH:MM[:SS], got 'lunch'"),
        ("hourly 03:00", "schedule 'hourly 03:00': hourly takes no time or date: '03:00'"),
        ("*-13-01", "schedule '*-13-01': month out of range 1..12: '13'"),
        ("*-02-30", "schedule '*-02-30': never matches a date"),
        ("0 0 31 4 *", "schedule '0 0 31 4 *': never matches a date"),
        ("*/0 * * * *", "schedule '*/0 * * * *': step must be at least 1: '*/0'"),
        ("5-1 * * * *", "schedule '5-1 * * * *': range goes backwards: '5-1'"),
        ("0 0 * foo *", "schedule '0 0 * foo *': not a month: 'foo'"),
        ("@often", "schedule '@often': unknown macro '@often'"),
        ("mon 02:00 03:00", "schedule 'mon 02:00 03:00': unexpected token '03:00'"),
        ("2025-01", "schedule '2025-01': month out of range 1..12: '2025'"),
        ("1-2-3-4", "schedule '1-2-3-4': a date is Y-M-D or M-D, got '1-2-3-4'"),
        ("1:2:3:4", "schedule '1:2:3:4': a time is HH:MM[:SS], got '1:2:3:4'"),
        ("*-*-,1", "schedule '*-*-,1': empty day in ',1'"),
    ],
)
def test_bad_expressions_name_the_token(expr: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(expr)
    assert message in str(e.value)


def test_matches() -> None:
    cal = parse("mon..fri 22:30")
    assert cal.matches(datetime(2025, 1, 10, 22, 30))
    assert not cal.matches(datetime(2025, 1, 11, 22, 30))
    assert not cal.matches(datetime(2025, 1, 10, 22, 30, 1))
    assert str(cal) == "mon..fri 22:30"


EXPRESSIONS = [
    "hourly",
    "daily 02:30",
    "mon..fri 22:30",
    "sat,sun 04:00",
    "*-*-01 03:00",
    "*-*-31 12:00",
    "*-02-29 01:00",
    "*:0/7:30",
    "30 2 * * 1-5",
    "*/13 */5 * * *",
    "0 0 13 * fri",
    "15 3 29 2 *",
]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]


NY = "America/New_York"


def _wall(t: datetime, zone: ZoneInfo) -> datetime:
    return t.astimezone(zone).replace(tzinfo=None)


def _occurrences(wall: datetime, zone: ZoneInfo) -> list[datetime]:
    """Every UTC instant whose wall time in ``zone`` is ``wall`` (none in a gap, two in a
    fold), found by trying both of the wall time's offsets and keeping what reads back."""
    found = {
        t
        for fold in (0, 1)
        if _wall(t := wall.replace(tzinfo=zone, fold=fold).astimezone(UTC), zone) == wall
    }
    return sorted(found)


def _gap_end(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant whose wall time is past the nonexistent ``wall``, by walking a
    minute, then a second, at a time from before the gap."""
    t = wall.replace(tzinfo=zone, fold=1).astimezone(UTC) - timedelta(hours=1)
    while _wall(t, zone) <= wall:
        t += timedelta(minutes=1)
    while _wall(t - timedelta(seconds=1), zone) > wall:
        t -= timedelta(seconds=1)
    return t


def _fires(cal: Calendar, wall: datetime, zone: ZoneInfo) -> list[datetime]:
    """The rule, stated once: the instants a matching wall time fires at."""
    at = _occurrences(wall, zone)
    if len(cal.hours) == 24:  # a rhythm: every occurrence in elapsed time, none in a gap
        return at
    return at[:1] if at else [_gap_end(wall, zone)]  # a time of day: once, or after the gap


def _expected_next(expr: str, after: datetime, zone: ZoneInfo) -> datetime:
    """Brute force: every matching wall time of every day from the day before ``after``
    on, through ``_fires``; the earliest instant after ``after`` (in UTC)."""
    cal = parse(expr)
    day: date = _wall(after, zone).date() - timedelta(days=1)
    best: datetime | None = None
    first_time = (cal.hours[0], cal.minutes[0], cal.seconds[0])
    while best is None or day <= _wall(best, zone).date() + timedelta(days=1):
        if cal.matches(datetime(day.year, day.month, day.day, *first_time)):
            for h, m, s in itertools.product(cal.hours, cal.minutes, cal.seconds):
                wall = datetime(day.year, day.month, day.day, h, m, s)
                later = [t for t in _fires(cal, wall, zone) if t > after]
                best = min([*later, *([best] if best else [])], default=None)
        day += timedelta(days=1)
    return best


@functools.cache
def _transitions(zone: str, year: int) -> tuple[datetime, ...]:
    """The instants (naive UTC) in ``year`` at which ``zone``'s UTC offset changes."""
    tz, found = ZoneInfo(zone), []
    t = datetime(year, 1, 1, tzinfo=UTC)
    offset = t.astimezone(tz).utcoffset()
    while t.year == year:
        t += timedelta(minutes=30)
        if (now := t.astimezone(tz).utcoffset()) != offset:
            found.append(t.replace(tzinfo=None))
            offset = now
    return tuple(found)


@st.composite
def _near_a_change(draw: st.DrawFn, zone: str) -> datetime:
    """A time within a day of one of ``zone``'s offset changes (uniform times rarely are)."""
    changes = _transitions(zone, draw(st.integers(1990, 2089)))
    if not changes:
        return draw(st.datetimes(datetime(1990, 1, 1), datetime(2090, 1, 1)))
    shift = timedelta(seconds=draw(st.integers(-86400, 86400)))
    return draw(st.sampled_from(changes)) + shift


@settings(max_examples=300, deadline=None)
@given(
    expr=st.sampled_from(EXPRESSIONS),
    zone_and_when=st.sampled_from(ZONES).flatmap(
        lambda zone: st.tuples(
            st.just(zone),
            st.one_of(
                st.datetimes(datetime(1990, 1, 1), datetime(2090, 1, 1)), _near_a_change(zone)
            ),
        )
    ),
)
# New York, 2010-03-14: 02:00 EST -> 03:00 EDT. A time of day in the gap fires at its end:
# from 00:00 EST, daily 02:30 fires at 03:00 EDT (07:00 UTC).
@example(expr="daily 02:30", zone_and_when=(NY, datetime(2010, 3, 14, 5, 0)))
# A rhythm skips the gap and keeps its beat: from 01:30 EST (06:30 UTC) the next :30 is
# 03:30 EDT (07:30 UTC), one hour later, not 03:00 EDT; from 01:56:30 EST, 03:00:30 EDT.
@example(expr="30 * * * *", zone_and_when=(NY, datetime(2010, 3, 14, 6, 30)))
@example(expr="*:0/7:30", zone_and_when=(NY, datetime(2010, 3, 14, 6, 56, 30)))
# New York, 2010-11-07: 02:00 EDT -> 01:00 EST, 01:00-01:59 twice. A time of day fires at
# the first occurrence (01:30 EDT, 05:30 UTC) and not at the second (06:30 UTC).
@example(expr="daily 01:30", zone_and_when=(NY, datetime(2010, 11, 7, 4, 0)))
@example(expr="daily 01:30", zone_and_when=(NY, datetime(2010, 11, 7, 5, 40)))
@example(expr="daily 02:30", zone_and_when=("Europe/Berlin", datetime(2010, 10, 31, 0, 40)))
# A rhythm fires at both: from 01:50 EDT (05:50 UTC) hourly fires at 01:00 EST (06:00 UTC).
@example(expr="hourly", zone_and_when=(NY, datetime(2010, 11, 7, 5, 50)))
def test_property_next_is_later_and_matches(expr: str, zone_and_when: tuple[str, datetime]) -> None:
    """The result is exactly the brute-force rule's: later than ``after``, a matching wall
    time's instant per ``_fires`` (first occurrence or end of gap for a time of day, every
    occurrence for a rhythm), and no such instant in between."""
    zone, when = zone_and_when
    tz = ZoneInfo(zone)
    after = when.replace(tzinfo=UTC)
    result = parse(expr).next_after(after, tz)
    assert result is not None
    assert result.tzinfo is tz
    assert result.astimezone(UTC) == _expected_next(expr, after, tz)
