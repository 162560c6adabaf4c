"""Retention: which snapshots a set of keep rules keeps, and why (pure; restic semantics).

``plan(snapshots, rules, now, tz)`` returns one ``Decision`` per snapshot. Rules are
evaluated per VM, over that VM's snapshots from newest to oldest:

- ``keep_last N``       the N newest snapshots;
- ``keep_hourly N`` …   for each calendar bucket (hour, day, ISO week, month, year, in the
  ``keep_yearly N``     time zone ``tz``), newest bucket first: the newest snapshot of the
                        bucket, for the N newest buckets that hold a snapshot;
- ``keep_within D``     every snapshot no older than D before the VM's *newest snapshot*
                        (restic's choice: a VM whose backups stopped keeps its history
                        instead of losing it as the clock runs on).

A snapshot is kept if any rule keeps it; the reasons list every rule that did. Always kept,
whatever the rules say:

- the newest snapshot of each VM ("newest of VM": the next incremental's parent, and the
  one restore point a VM must never lose to a typo in the rules);
- protected snapshots ("protected");
- the newest full snapshot of a VM whose newest snapshot is a differential (its base: the
  next differential reads changes since that full's checkpoint);
- snapshots whose time is after ``now`` ("time in the future"): a clock problem, not a
  reason to delete.

Held snapshots (``Candidate.held``: a policy's retention holds the snapshots made by hand,
unless its ``include_manual`` says otherwise) are kept with that reason and are not counted
by the rules: ``keep_last``, the buckets and ``keep_within`` (counted from the VM's newest
snapshot that is not held) see only the others, so a hand-made backup neither fills a
policy's bucket nor pushes one of its snapshots out.

Failed or killed backups never become snapshots (no manifest, no catalog row; recovery
deletes their directories), so every candidate is a complete restore point and counts for
the buckets like any other.

The plan is idempotent: re-planning the kept snapshots with the same rules keeps them all
(each rule's picks from the full set are also its picks from the kept subset). Hourly
buckets use local wall-clock hours, so on a DST fall-back day the repeated hour is one
bucket (as in restic).
"""

import re
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, tzinfo
from typing import Final

import msgspec

_DURATION: Final = re.compile(r"(\d+)([ymwdh])")
_UNITS: Final = "ymwdh"


class Rules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Keep rules; ``None`` (or 0) disables a rule. ``keep_within`` is a duration such as
    ``"30d"``, ``"12h"``, ``"2w"``, ``"6m"`` (months), ``"1y"`` or ``"1y6m"``."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None

    def validate(self) -> None:
        """Raise ValueError for a negative count or a malformed duration."""
        for name in (*_BUCKET_RULES, "keep_last"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{_flag(name)} must be 0 or more, not {value}")
        if self.keep_within is not None:
            Duration.parse(self.keep_within)

    def empty(self) -> bool:
        """True if no rule would keep anything (prune refuses to run then)."""
        counts = [getattr(self, n) for n in (*_BUCKET_RULES, "keep_last")]
        return not any(counts) and not self.keep_within

    def describe(self) -> str:
        parts = [
            f"{_flag(n)} {getattr(self, n)}"
            for n in ("keep_last", *_BUCKET_RULES)
            if getattr(self, n)
        ]
        if self.keep_within:
            parts.append(f"keep-within {self.keep_within}")
        return ", ".join(parts) or "(no rules)"


class Duration(msgspec.Struct, frozen=True):
    """A calendar duration: years and months are calendar steps, the rest fixed."""

    text: str
    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> "Duration":
        """``30d``, ``12h``, ``2w``, ``6m`` (months), ``1y``, ``1y6m2d``; else ValueError."""
        compact = text.strip().lower()
        parts = _DURATION.findall(compact)
        if not parts or "".join(n + u for n, u in parts) != compact:
            raise ValueError(
                f"not a duration: {text!r} (examples: 30d, 12h, 2w, 6m for months, 1y6m)"
            )
        seen = [u for _, u in parts]
        if len(set(seen)) != len(seen) or seen != sorted(seen, key=_UNITS.index):
            raise ValueError(f"not a duration: {text!r} (give each unit once, largest first)")
        n = {u: int(v) for v, u in parts}
        return cls(
            text=text.strip(),
            years=n.get("y", 0),
            months=n.get("m", 0),
            days=n.get("d", 0) + 7 * n.get("w", 0),
            hours=n.get("h", 0),
        )

    def before(self, t: datetime) -> datetime:
        """``t`` minus this duration (months clamp to the month's last day, like 03-31 → 02-28)."""
        month_index = t.year * 12 + (t.month - 1) - (self.years * 12 + self.months)
        year, month = divmod(month_index, 12)
        month += 1
        day = min(t.day, _days_in_month(year, month))
        return t.replace(year=year, month=month, day=day) - timedelta(
            days=self.days, hours=self.hours
        )


class Candidate(msgspec.Struct, frozen=True):
    """What retention needs to know of a snapshot. ``time`` must be timezone-aware."""

    snapshot_id: str
    vm_id: str
    vm_name: str
    time: datetime
    level: str = "full"
    protected: bool = False
    held: str | None = None  # why the rules must not count or remove it (module docstring)


class Decision(msgspec.Struct, frozen=True):
    snapshot_id: str
    vm_id: str
    vm_name: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...]  # why kept; for a removal, why nothing kept it

    @property
    def action(self) -> str:
        return "keep" if self.keep else "remove"


_BUCKET_RULES: Final = (
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
)

# Bucket key (comparable for equality) and its label, from a time already in the plan's zone.
_BUCKETS: Final[dict[str, Callable[[datetime], str]]] = {
    "keep_hourly": lambda t: f"{t:%Y-%m-%d %H}h",
    "keep_daily": lambda t: f"{t:%Y-%m-%d}",
    "keep_weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "keep_monthly": lambda t: f"{t:%Y-%m}",
    "keep_yearly": lambda t: f"{t:%Y}",
}

NO_RULE: Final = "no rule keeps it"


def plan(
    snapshots: Iterable[Candidate],
    rules: Rules,
    now: datetime,
    tz: tzinfo | None = None,
) -> list[Decision]:
    """One decision per snapshot, ordered by VM name, VM id, then newest first.

    ``tz`` is the zone of the calendar buckets (``None``: the machine's local zone, per
    instant, so DST is followed). Raises ValueError for invalid rules or a naive time.
    """
    rules.validate()
    within = Duration.parse(rules.keep_within) if rules.keep_within else None
    by_vm: dict[str, list[Candidate]] = {}
    for s in snapshots:
        if s.time.tzinfo is None:
            raise ValueError(f"snapshot {s.snapshot_id} of VM {s.vm_name}: time has no zone")
        by_vm.setdefault(s.vm_id, []).append(s)
    out: list[Decision] = []
    for vm_snaps in sorted(by_vm.values(), key=lambda v: (v[0].vm_name, v[0].vm_id)):
        vm_snaps.sort(key=lambda s: (s.time, s.snapshot_id), reverse=True)
        out += _plan_vm(vm_snaps, rules, within, now, tz)
    return out


def _plan_vm(
    snaps: list[Candidate],
    rules: Rules,
    within: Duration | None,
    now: datetime,
    tz: tzinfo | None,
) -> list[Decision]:
    """``snaps``: one VM's snapshots, newest first."""
    reasons: list[list[str]] = [[] for _ in snaps]
    reasons[0].append("newest of VM")
    if snaps[0].level == "differential":
        base = next((i for i, s in enumerate(snaps) if s.level == "full"), None)
        if base is not None:
            reasons[base].append("base of the newest differential")
    for i, s in enumerate(snaps):
        if s.protected:
            reasons[i].append("protected")
        if s.time > now:
            reasons[i].append("time in the future")
        if s.held is not None:
            reasons[i].append(s.held)
    ruled = [i for i, s in enumerate(snaps) if s.held is None]  # what the rules count
    for n, i in enumerate(ruled[: rules.keep_last or 0]):
        reasons[i].append(f"keep-last {n + 1}/{rules.keep_last}")
    for name in _BUCKET_RULES:
        left: int = getattr(rules, name) or 0
        last_bucket = None
        for i in ruled:
            if left <= 0:
                break
            bucket = _BUCKETS[name](snaps[i].time.astimezone(tz))
            if bucket != last_bucket:
                reasons[i].append(f"{_flag(name)} {bucket}")
                last_bucket = bucket
                left -= 1
    if within is not None and ruled:
        cutoff = within.before(snaps[ruled[0]].time)
        for i in ruled:
            if snaps[i].time >= cutoff:
                reasons[i].append(f"within {within.text}")
    return [
        Decision(
            snapshot_id=s.snapshot_id,
            vm_id=s.vm_id,
            vm_name=s.vm_name,
            time=s.time,
            keep=bool(r),
            reasons=tuple(r) if r else (NO_RULE,),
        )
        for s, r in zip(snaps, reasons, strict=True)
    ]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _days_in_month(year: int, month: int) -> int:
    if month == 12:
        return 31
    return (datetime(year, month + 1, 1) - timedelta(days=1)).day
