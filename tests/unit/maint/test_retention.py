"""Retention planning: restic's rules per VM, calendar edges, and properties."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.maint.retention import NO_RULE, Candidate, Decision, Duration, Rules, plan

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def snap(sid: str, t: str, vm: str = "vm1", **kw: object) -> Candidate:
    return Candidate(
        snapshot_id=sid,
        vm_id=vm,
        vm_name=vm,
        time=datetime.fromisoformat(t).replace(tzinfo=UTC)
        if "+" not in t
        else datetime.fromisoformat(t),
        **kw,  # type: ignore[arg-type]
    )


def kept(decisions: list[Decision]) -> set[str]:
    return {d.snapshot_id for d in decisions if d.keep}


def reasons(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.snapshot_id: d.reasons for d in decisions}


def daily_series(n: int, start: str = "2026-11-01T10:00") -> list[Candidate]:
    t0 = datetime.fromisoformat(start).replace(tzinfo=UTC)
    return [
        snap(f"d{i:02d}", (t0 + timedelta(days=i)).isoformat(timespec="seconds")) for i in range(n)
    ]


def test_keep_last_keeps_the_n_newest_with_reasons() -> None:
    d = plan(daily_series(5), Rules(keep_last=2), NOW, UTC)
    assert kept(d) == {"d04", "d03"}
    r = reasons(d)
    assert r["d04"] == ("newest of VM", "keep-last 1/2")
    assert r["d03"] == ("keep-last 2/2",)
    assert r["d00"] == (NO_RULE,)
    assert [x.snapshot_id for x in d] == ["d04", "d03", "d02", "d01", "d00"]  # newest first


def test_keep_daily_keeps_the_newest_of_each_day() -> None:
    snaps = [
        snap("a", "2026-11-27T08:00"),
        snap("b", "2026-11-27T20:00"),
        snap("c", "2026-11-26T23:59"),
        snap("d", "2026-11-26T01:00"),
        snap("e", "2026-11-25T12:00"),
    ]
    d = plan(snaps, Rules(keep_daily=2), NOW, UTC)
    assert kept(d) == {"b", "c"}
    assert reasons(d)["b"] == ("newest of VM", "keep-daily 2026-11-27")
    assert reasons(d)["c"] == ("keep-daily 2026-11-26",)


def test_buckets_follow_the_time_zone() -> None:
    # 23:30 UTC on the 26th is already the 27th in Berlin: both are one Berlin day.
    snaps = [snap("late", "2026-11-26T23:30"), snap("early", "2026-11-27T05:00")]
    assert kept(plan(snaps, Rules(keep_daily=5), NOW, UTC)) == {"late", "early"}
    berlin = plan(snaps, Rules(keep_daily=5), NOW, ZoneInfo("Europe/Berlin"))
    assert kept(berlin) == {"early"}
    assert reasons(berlin)["early"] == ("newest of VM", "keep-daily 2026-11-27")


def test_iso_week_53_spans_the_year_boundary() -> None:
    # 2026 has 53 ISO weeks; 2026-12-28 (Mon) .. 2027-01-03 (Sun) are all 2026-W53.
    snaps = [
        snap("mon", "2026-12-28T10:00"),
        snap("thu", "2026-12-31T10:00"),
        snap("sun", "2027-01-03T10:00"),
        snap("next", "2027-01-04T10:00"),  # 2027-W01
        snap("prev", "2026-12-27T10:00"),  # 2026-W52 (Sunday)
    ]
    d = plan(snaps, Rules(keep_weekly=3), datetime(2027, 2, 1, tzinfo=UTC), UTC)
    r = reasons(d)
    assert kept(d) == {"next", "sun", "prev"}
    assert r["sun"] == ("keep-weekly 2026-W53",)
    assert r["next"] == ("newest of VM", "keep-weekly 2027-W01")
    assert r["prev"] == ("keep-weekly 2026-W52",)


def test_yearly_and_monthly_at_the_year_boundary() -> None:
    snaps = [
        snap("dec31", "2026-12-31T23:00"),
        snap("jan1", "2027-01-01T00:30"),
        snap("dec1", "2026-12-01T00:00"),
        snap("nov30", "2026-11-30T23:59"),
    ]
    d = plan(snaps, Rules(keep_yearly=2, keep_monthly=3), datetime(2027, 2, 1, tzinfo=UTC), UTC)
    r = reasons(d)
    assert r["jan1"] == ("newest of VM", "keep-monthly 2027-01", "keep-yearly 2027")
    assert r["dec31"] == ("keep-monthly 2026-12", "keep-yearly 2026")
    assert r["dec1"] == (NO_RULE,)
    assert r["nov30"] == ("keep-monthly 2026-11",)


def test_month_ends_and_leap_day() -> None:
    snaps = [
        snap("feb29", "2028-02-29T12:00"),
        snap("feb28", "2028-02-28T12:00"),
        snap("jan31", "2028-01-31T12:00"),
        snap("mar1", "2028-03-01T00:00"),
    ]
    d = plan(snaps, Rules(keep_monthly=2), datetime(2028, 4, 1, tzinfo=UTC), UTC)
    assert kept(d) == {"mar1", "feb29"}


def test_dst_fall_back_hour_is_one_local_bucket() -> None:
    # Europe/Berlin 2026-10-25: 02:00–03:00 local happens twice (00:xx and 01:xx UTC).
    berlin = ZoneInfo("Europe/Berlin")
    snaps = [
        snap("first", "2026-10-25T00:10"),  # 02:10 CEST
        snap("second", "2026-10-25T01:10"),  # 02:10 CET
        snap("before", "2026-10-24T23:50"),  # 01:50 CEST
    ]
    d = plan(snaps, Rules(keep_hourly=10), NOW, berlin)
    assert kept(d) == {"second", "before"}
    assert reasons(d)["second"] == ("newest of VM", "keep-hourly 2026-10-25 02h")
    # and the 25-hour DST day is one daily bucket (01:50 CEST is on it too)
    d = plan([*snaps, snap("eve", "2026-10-24T21:59")], Rules(keep_daily=10), NOW, berlin)
    assert kept(d) == {"second", "eve"}
    assert reasons(d)["eve"] == ("keep-daily 2026-10-24",)


def test_spring_forward_day_in_new_york() -> None:
    ny = ZoneInfo("America/New_York")
    snaps = [
        snap("a", "2026-03-08T06:30"),  # 01:30 EST
        snap("b", "2026-03-08T07:30"),  # 03:30 EDT (02:xx does not exist)
        snap("c", "2026-03-08T04:59"),  # 23:59 EST on the 7th
    ]
    d = plan(snaps, Rules(keep_hourly=5, keep_daily=5), NOW, ny)
    r = reasons(d)
    assert r["b"] == ("newest of VM", "keep-hourly 2026-03-08 03h", "keep-daily 2026-03-08")
    assert r["a"] == ("keep-hourly 2026-03-08 01h",)
    assert r["c"] == ("keep-hourly 2026-03-07 23h", "keep-daily 2026-03-07")


def test_keep_within_counts_back_from_the_newest_snapshot() -> None:
    snaps = daily_series(40, "2026-01-01T00:00")  # newest 2026-02-09
    d = plan(snaps, Rules(keep_within="10d"), datetime(2027, 1, 1, tzinfo=UTC), UTC)
    assert kept(d) == {f"d{i:02d}" for i in range(29, 40)}
    assert reasons(d)["d29"] == ("within 10d",)


def test_keep_within_months_clamp_to_month_end() -> None:
    assert Duration.parse("1m").before(datetime(2026, 3, 31, tzinfo=UTC)) == datetime(
        2026, 2, 28, tzinfo=UTC
    )
    assert Duration.parse("1y2w").before(datetime(2028, 2, 29, tzinfo=UTC)) == datetime(
        2027, 2, 14, tzinfo=UTC
    )
    assert Duration.parse("12h").before(NOW) == NOW - timedelta(hours=12)


@pytest.mark.parametrize("text", ["", "30", "d", "3x", "1d2y", "1d1d", "-1d", "1.5d", "30 d"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        Duration.parse(text)


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="keep-daily must be 0 or more"):
        plan([], Rules(keep_daily=-1), NOW)


def test_protected_and_newest_are_kept_without_rules() -> None:
    snaps = [*daily_series(3), snap("p", "2026-10-01T00:00", protected=True)]
    d = plan(snaps, Rules(keep_last=1), NOW, UTC)
    assert kept(d) == {"d02", "p"}
    assert reasons(d)["p"] == ("protected",)
    assert Rules().empty() and not Rules(keep_within="1d").empty()
    assert Rules(keep_last=0).empty()


def test_rules_are_evaluated_per_vm() -> None:
    snaps = [
        snap("a1", "2026-11-20T00:00", vm="a"),
        snap("a2", "2026-11-21T00:00", vm="a"),
        snap("b1", "2026-11-01T00:00", vm="b"),
        snap("b2", "2026-11-02T00:00", vm="b"),
        snap("b3", "2026-11-03T00:00", vm="b"),
    ]
    d = plan(snaps, Rules(keep_last=2), NOW, UTC)
    assert kept(d) == {"a1", "a2", "b2", "b3"}
    assert [x.vm_name for x in d] == ["a", "a", "b", "b", "b"]


def test_differential_base_is_kept() -> None:
    snaps = [
        snap("f1", "2026-11-01T00:00", level="full"),
        snap("f2", "2026-11-08T00:00", level="full"),
        snap("x1", "2026-11-09T00:00", level="differential"),
        snap("x2", "2026-11-10T00:00", level="differential"),
    ]
    d = plan(snaps, Rules(keep_last=1), NOW, UTC)
    assert kept(d) == {"x2", "f2"}
    assert reasons(d)["f2"] == ("base of the newest differential",)


def test_future_snapshots_are_kept() -> None:
    snaps = [*daily_series(3), snap("fut", "2027-06-01T00:00")]
    d = plan(snaps, Rules(keep_last=1), NOW, UTC)
    assert reasons(d)["fut"] == ("newest of VM", "time in the future", "keep-last 1/1")


def test_naive_times_are_refused_naming_the_snapshot() -> None:
    naive = Candidate("s1", "v", "vm-x", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="snapshot s1 of VM vm-x"):
        plan([naive], Rules(keep_last=1), NOW)


# --- properties ------------------------------------------------------------------------------

_T0 = datetime(2024, 1, 1, tzinfo=UTC)
_counts = st.one_of(st.none(), st.integers(0, 6))
rules_st = st.builds(
    Rules,
    keep_last=_counts,
    keep_hourly=_counts,
    keep_daily=_counts,
    keep_weekly=_counts,
    keep_monthly=_counts,
    keep_yearly=_counts,
    keep_within=st.one_of(st.none(), st.sampled_from(["12h", "3d", "2w", "1m", "1y"])),
)
snapshots_st = st.lists(
    st.tuples(
        st.sampled_from(["vm-a", "vm-b", "vm-c"]),
        st.integers(0, 3 * 365 * 24 * 60),  # minutes after _T0
        st.booleans(),
        st.sampled_from(["full", "incremental", "differential"]),
    ),
    max_size=40,
).map(
    lambda rows: [
        Candidate(
            snapshot_id=f"s{i:03d}",
            vm_id=vm,
            vm_name=vm,
            time=_T0 + timedelta(minutes=m),
            level=level,
            protected=prot and i % 3 == 0,
        )
        for i, (vm, m, prot, level) in enumerate(rows)
    ]
)
zones = st.sampled_from([UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")])


@settings(max_examples=300, deadline=None)
@given(snapshots_st, rules_st, zones)
def test_never_removes_protected_or_newest_and_is_idempotent(
    snaps: list[Candidate], rules: Rules, tz: ZoneInfo
) -> None:
    now = _T0 + timedelta(days=4 * 365)
    decisions = plan(snaps, rules, now, tz)
    assert sorted(d.snapshot_id for d in decisions) == sorted(s.snapshot_id for s in snaps)
    keep = kept(decisions)
    for s in snaps:
        if s.protected:
            assert s.snapshot_id in keep
    for vm in {s.vm_id for s in snaps}:
        newest = max((s for s in snaps if s.vm_id == vm), key=lambda s: (s.time, s.snapshot_id))
        assert newest.snapshot_id in keep
    for d in decisions:
        assert d.reasons and (d.keep or d.reasons == (NO_RULE,))
    survivors = [s for s in snaps if s.snapshot_id in keep]
    again = plan(survivors, rules, now, tz)
    assert all(d.keep for d in again)


@settings(max_examples=200, deadline=None)
@given(snapshots_st, st.integers(1, 10))
def test_keep_last_alone_keeps_exactly_the_n_newest(snaps: list[Candidate], n: int) -> None:
    snaps = [
        Candidate(s.snapshot_id, "vm", "vm", s.time, "incremental") for s in snaps
    ]  # one VM, unprotected, no differential base
    decisions = plan(snaps, Rules(keep_last=n), _T0 + timedelta(days=4 * 365), UTC)
    newest = sorted(snaps, key=lambda s: (s.time, s.snapshot_id), reverse=True)[:n]
    assert kept(decisions) == {s.snapshot_id for s in newest}


def test_held_snapshots_are_kept_and_not_counted_by_the_rules() -> None:
    """A hand-made backup a policy holds is kept, and the policy's own snapshots are
    counted as if it were not there: it fills no bucket and pushes none out."""
    held = "made by hand"
    snaps = [
        snap("p1", "2026-11-01T02:00"),
        snap("p2", "2026-11-02T02:00"),
        snap("m1", "2026-11-02T14:00", held=held),  # the newest of its day
        snap("p3", "2026-11-03T02:00"),
        snap("m2", "2026-11-03T09:00", held=held),  # the newest of the VM
    ]
    now = datetime(2026, 11, 4, tzinfo=UTC)
    d = reasons(plan(snaps, Rules(keep_last=2), now))
    assert kept(plan(snaps, Rules(keep_last=2), now)) == {"p3", "p2", "m1", "m2"}
    assert d["p3"] == ("keep-last 1/2",) and d["p2"] == ("keep-last 2/2",)
    assert d["m1"] == (held,) and d["m2"] == ("newest of VM", held)
    assert d["p1"] == (NO_RULE,)

    daily = plan(snaps, Rules(keep_daily=2), now)
    assert kept(daily) == {"p3", "p2", "m1", "m2"}  # p2 keeps its day, not m1
    assert reasons(daily)["p2"] == ("keep-daily 2026-11-02",)

    # keep_within counts from the newest snapshot the rules see (p3), not from m2.
    within = reasons(plan(snaps, Rules(keep_within="1d"), now))
    assert within["p2"] == ("within 1d",) and within["p1"] == (NO_RULE,)

    # Not held: the same snapshots are counted like any other.
    plain = [msgspec.structs.replace(s, held=None) for s in snaps]
    assert kept(plan(plain, Rules(keep_last=2), now)) == {"m2", "p3"}
