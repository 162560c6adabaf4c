"""Lock dates by generation (``engine.store.retention``)."""

import pytest

from engine.store.retention import LockPolicy, describe_duration, parse_duration

DAY = 86400


def test_dates_are_rounded_up_to_generations_and_cover_the_duration() -> None:
    policy = LockPolicy("COMPLIANCE", 30 * DAY)
    assert policy.generation == 7.5 * DAY
    t0 = 1_800_000_000.0
    dates = {policy.date(t0 + s) for s in range(0, int(policy.generation), 3600)}
    assert len(dates) <= 2, "a generation's writes share at most two dates"
    for s in range(0, 20 * DAY, 7 * 3600):
        now = t0 + s
        until = policy.date(now)
        assert now + policy.seconds <= until < now + policy.seconds + policy.generation
        assert until % policy.generation == 0
        assert policy.covers(until, now)
        # A date covers later backups until the duration catches up with it, not longer.
        assert not policy.covers(until, until - policy.seconds + 1)


def test_unknown_or_short_dates_do_not_cover() -> None:
    policy = LockPolicy("GOVERNANCE", 100)
    assert not policy.covers(None, 0)
    assert not policy.covers(99, 0)
    assert policy.covers(100, 0)


@pytest.mark.parametrize(
    ("mode", "seconds"), [("governance", 10), ("LEGAL", 10), ("COMPLIANCE", 0)]
)
def test_bad_policies_are_refused(mode: str, seconds: int) -> None:
    with pytest.raises(ValueError):
        LockPolicy(mode, seconds)


def test_durations() -> None:
    assert parse_duration("30d") == 30 * DAY
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration(" 2W ") == 14 * DAY
    assert parse_duration("45") == 45
    for bad in ("", "0d", "-1d", "1y", "d", "1.5d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert describe_duration(30 * DAY) == "30d"
    assert describe_duration(14 * DAY) == "2w"
    assert describe_duration(90) == "90s"
    assert describe_duration(5400) == "90m"
