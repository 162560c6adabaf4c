"""Calendar expressions: a table of next-run times, the DST rules, errors, and properties."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import ConfigError
from engine.sched.calendar import parse

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
        ("hourly", "2025-10-26 02:00", "2025-10-26T03:00:00+01:00"),  # 02:00 fires once
        ("30 2 * * *", "2025-03-29 12:00", "2025-03-30T03:00:00+02:00"),
    ],
)
def test_next_after(expr: str, after: str, expected: str) -> None:
    assert nxt(expr, after) == expected


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


def _in_gap(result: datetime, cal_text: str, zone: ZoneInfo) -> bool:
    """The result is the end of a DST gap that swallowed a matching wall time."""
    cal = parse(cal_text)
    before = (result - timedelta(seconds=1)).astimezone(zone).replace(tzinfo=None)
    after = result.astimezone(zone).replace(tzinfo=None)
    t = before + timedelta(seconds=1)
    while t < after:
        if cal.matches(t):
            return True
        t += timedelta(seconds=1)
    return False


@settings(max_examples=300, deadline=None)
@given(
    expr=st.sampled_from(EXPRESSIONS),
    zone=st.sampled_from(ZONES),
    when=st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_property_next_is_later_and_matches(expr: str, zone: str, when: datetime) -> None:
    tz = ZoneInfo(zone)
    after = when.replace(tzinfo=UTC)
    result = parse(expr).next_after(after, tz)
    assert result is not None
    assert result.astimezone(UTC) > after
    wall = result.astimezone(tz).replace(tzinfo=None)
    assert parse(expr).matches(wall) or _in_gap(result, expr, tz)
    # Nothing in between: the instant just before the result leads to the result again.
    just_before = result.astimezone(UTC) - timedelta(seconds=1)
    if just_before > after:
        again = parse(expr).next_after(just_before, tz)
        assert again is not None
        assert again.astimezone(UTC) == result.astimezone(UTC)
