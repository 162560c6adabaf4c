"""Calendar expressions: parse once, then ask for the next matching instant.

Two syntaxes, told apart by shape (five whitespace-separated fields or an ``@`` macro is
cron; anything else is systemd-like):

* systemd ``OnCalendar``-like: ``[WEEKDAYS] [Y-M-D | M-D] [HH:MM[:SS]]`` — weekdays as
  ``mon..fri`` or ``sat,sun``; date and time components as ``*``, numbers, lists ``1,15``,
  ranges ``1..5`` and steps ``*/2``, ``0..30/10``. A missing date is ``*-*-*``, a missing
  time ``00:00:00``. Shortcuts: ``minutely``, ``hourly``, ``daily``, ``weekly`` (Monday),
  ``monthly`` (the 1st), ``quarterly``, ``semiannually``, ``yearly``/``annually``;
  ``daily 02:00``, ``weekly 03:30``, ``monthly 04:00`` give the shortcut a time. Weekdays
  and the date must both match.
* cron, five fields ``minute hour day-of-month month day-of-week`` with ``*``, ``*/n``,
  lists, ranges ``a-b[/n]``, month names ``jan..dec``, weekday names ``sun..sat`` (0 and 7
  are Sunday), and the macros ``@hourly @daily @midnight @weekly @monthly @yearly
  @annually``. As in Vixie cron, when both day fields are restricted (neither starts with
  ``*``) a day matches if *either* does.

Times are wall-clock times in a zone (zoneinfo). Every error is a ``ConfigError`` quoting
the expression and the bad token.

Daylight-saving changes. A matching wall time that exists once fires at that instant. The
rest depends on whether the expression is a *time of day* (its hours are not all 24:
``daily 02:30``, ``mon..fri 22:30``, cron ``30 2 * * *``) or a *rhythm* (it matches in every
hour of a matching day: ``hourly``, ``*:0/15``, cron ``30 * * * *``; ``Calendar.every_hour``):

* spring forward (a gap: wall times that do not exist). A time of day in the gap fires once,
  at the first instant after the gap (the transition), however many of its wall times the
  gap swallowed: ``daily 02:30`` in New York on 2010-03-14 fires at 03:00 EDT. Vixie cron
  and cronie do the same (fixed-time jobs a forward change skipped run right after it);
  systemd skips them (systemd issue 5595), which for a backup is a lost day.
  A rhythm skips the wall times in the gap: it follows elapsed time, and its next match
  after the gap comes on its beat (``*:05``: 01:05 EST, then 03:05 EDT, one hour later).
* fall back (a fold: wall times that exist twice). A time of day fires once, at the first
  occurrence (``daily 01:30`` in New York on 2010-11-07: 01:30 EDT, not again at 01:30 EST).
  A rhythm fires at both occurrences, so an hourly schedule stays one hour apart in elapsed
  time (cron schedules its wildcard jobs normally through both changes; systemd counts
  skipping them a bug, systemd issue 8647). Cron tells the two kinds apart by syntax (a
  ``*`` in the minute or hour field); here it is the hours matched, so ``*/5 2 * * *`` is
  a time of day and still fires once on a spring-forward night.
"""

import calendar as _cal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from engine.core.errors import ConfigError

# A Gregorian calendar repeats its weekday/date pattern every 400 years: an expression that
# matches nothing in 400 years (Feb 30, Apr 31) never matches.
SEARCH_YEARS = 400
MIN_YEAR, MAX_YEAR = 1970, 2199  # systemd's range for explicit years
# A rhythm's second occurrences in a fold lie before the wall time of the instant asked
# about; the search starts that much earlier when the UTC offset drops within this window.
# Folds since 1970 are at most hours long (the longest, Antarctica/Vostok in 1994, 7 h).
FOLD_LOOKAHEAD_HOURS = 24

_WEEKDAYS = {
    name: i
    for i, names in enumerate(
        [
            ("mon", "monday"),
            ("tue", "tuesday"),
            ("wed", "wednesday"),
            ("thu", "thursday"),
            ("fri", "friday"),
            ("sat", "saturday"),
            ("sun", "sunday"),
        ]
    )
    for name in names
}
_MONTHS = {name: i for i, name in enumerate(_cal.month_abbr) if name} | {
    name: i for i, name in enumerate(_cal.month_name) if name
}
_MONTHS = {k.lower(): v for k, v in _MONTHS.items()}
_CRON_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}

_SHORTCUTS = {
    "minutely": ("*-*-*", "*:*:00"),
    "hourly": ("*-*-*", "*:00:00"),
    "daily": ("*-*-*", "00:00:00"),
    "weekly": ("*-*-*", "00:00:00"),  # plus Monday, below
    "monthly": ("*-*-01", "00:00:00"),
    "quarterly": ("*-01,04,07,10-01", "00:00:00"),
    "semiannually": ("*-01,07-01", "00:00:00"),
    "yearly": ("*-01-01", "00:00:00"),
    "annually": ("*-01-01", "00:00:00"),
}
_CRON_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


@dataclass(frozen=True, slots=True)
class Calendar:
    """A parsed expression: the sets of values each field may take (all sorted)."""

    text: str
    years: tuple[int, ...] | None  # None: every year
    months: tuple[int, ...]
    days: tuple[int, ...]
    weekdays: frozenset[int]  # 0 = Monday … 6 = Sunday
    hours: tuple[int, ...]
    minutes: tuple[int, ...]
    seconds: tuple[int, ...]
    either_day: bool = False  # cron: both day fields restricted → either may match

    def __str__(self) -> str:
        return self.text

    def day_matches(self, day: date) -> bool:
        dom = day.day in self.days
        dow = day.weekday() in self.weekdays
        if self.either_day:
            return dom or dow
        return dom and dow and (self.years is None or day.year in self.years)

    def matches(self, wall: datetime) -> bool:
        """Whether a wall-clock time (its tzinfo is ignored) is one of the expression's."""
        return (
            (self.years is None or wall.year in self.years)
            and wall.month in self.months
            and self.day_matches(wall.date())
            and wall.hour in self.hours
            and wall.minute in self.minutes
            and wall.second in self.seconds
            and wall.microsecond == 0
        )

    @property
    def every_hour(self) -> bool:
        """Whether the expression matches in every hour of a matching day (a *rhythm*, not
        a time of day): it then follows elapsed time across daylight-saving changes (see the
        module docstring)."""
        return len(self.hours) == 24

    def next_after(self, after: datetime, tz: tzinfo | None = None) -> datetime | None:
        """The first instant strictly after ``after`` at which the expression fires in
        ``tz`` (default: ``after``'s zone; the daylight-saving rules are the module
        docstring's), as an aware datetime in ``tz``; None if there is none (an explicit
        year list that has run out). ``after`` must be aware."""
        if after.tzinfo is None:
            raise ValueError("next_after needs an aware datetime")
        zone = tz if tz is not None else after.tzinfo
        after_utc = after.astimezone(UTC)
        start = _scan_start(after_utc, zone)
        first_day = start.date()
        rhythm = self.every_hour
        # Wall times are tried in order. First occurrences (and ends of gaps) grow with the
        # wall time, so the first one after ``after`` ends the search; a rhythm's second
        # occurrence of an earlier wall time may come before it, and is kept in ``second``.
        second: datetime | None = None
        for day in self._days(first_day):
            begin = (start.hour, start.minute, start.second) if day == first_day else None
            for h, m, s in self._times(begin):
                wall = datetime(day.year, day.month, day.day, h, m, s)
                first, again = _instants(wall, zone)
                if rhythm and again is not None and again > after_utc:
                    second = again if second is None else min(second, again)
                if first is None and not rhythm:
                    first = _gap_end(wall, zone)
                if first is not None and first > after_utc:  # UTC: same-zone ignores fold
                    return (first if second is None else min(first, second)).astimezone(zone)
        return second.astimezone(zone) if second is not None else None

    def _days(self, start: date) -> Iterator[date]:
        for year in range(start.year, start.year + SEARCH_YEARS + 1):
            if self.years is not None:
                if year > self.years[-1]:
                    return
                if year not in self.years:
                    continue
            for month in self.months:
                if (year, month) < (start.year, start.month):
                    continue
                length = _cal.monthrange(year, month)[1]
                for d in range(1, length + 1) if self.either_day else self.days:
                    if d > length:
                        break
                    day = date(year, month, d)
                    if day >= start and self.day_matches(day):
                        yield day

    def _times(self, begin: tuple[int, int, int] | None) -> Iterator[tuple[int, int, int]]:
        for h in self.hours:
            if begin is not None and h < begin[0]:
                continue
            same_h = begin is not None and h == begin[0]
            for m in self.minutes:
                if same_h and begin is not None and m < begin[1]:
                    continue
                same_m = same_h and begin is not None and m == begin[1]
                for s in self.seconds:
                    if same_m and begin is not None and s < begin[2]:
                        continue
                    yield h, m, s


def _scan_start(after_utc: datetime, zone: tzinfo) -> datetime:
    """The first wall time to try for instants after ``after_utc``: one second after its
    wall time, or earlier by the drop when the UTC offset drops within
    ``FOLD_LOOKAHEAD_HOURS`` (the fold ahead repeats wall times before it)."""
    lowest = min(
        offset
        for k in range(FOLD_LOOKAHEAD_HOURS + 1)
        if (offset := (after_utc + timedelta(hours=k)).astimezone(zone).utcoffset()) is not None
    )
    naive = after_utc.replace(tzinfo=None, microsecond=0)
    return naive + lowest + timedelta(seconds=1)


def _instants(wall: datetime, zone: tzinfo) -> tuple[datetime | None, datetime | None]:
    """The UTC instants of a naive wall time: (first occurrence, second occurrence in a
    fold or None); (None, None) when it falls in a gap."""
    first = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: the first occurrence
    if first.astimezone(zone).replace(tzinfo=None) != wall:
        return None, None
    later = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    return first, later if later != first else None


def _gap_end(wall: datetime, zone: tzinfo) -> datetime:
    """The transition instant that ends the gap holding the nonexistent ``wall``."""
    # In a gap fold=0 reads the wall time with the offset before the transition (a later
    # UTC instant) and fold=1 with the offset after (an earlier one); the transition lies
    # between. Binary search for the first second carrying the new offset.
    late = wall.replace(tzinfo=zone).astimezone(UTC)
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(UTC).timestamp())
    hi = int(late.timestamp())
    after_offset = late.astimezone(zone).utcoffset()
    while lo < hi:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == after_offset:
            hi = mid
        else:
            lo = mid + 1
    return datetime.fromtimestamp(hi, UTC)


def next_after(
    expr: "str | Calendar | Sequence[Calendar]", after: datetime, tz: tzinfo | None = None
) -> datetime | None:
    """The earliest instant after ``after`` matched by ``expr`` (one expression, its text,
    or several: the earliest of them), in ``tz``; None if none ever matches again."""
    if isinstance(expr, str):
        calendars = [parse(expr)]
    elif isinstance(expr, Calendar):
        calendars = [expr]
    else:
        calendars = list(expr)
    found = [t for c in calendars if (t := c.next_after(after, tz)) is not None]
    return min(found, key=lambda t: t.astimezone(UTC)) if found else None


def parse(text: str) -> Calendar:
    """Parse one expression. Raises ConfigError quoting the expression and the bad token."""
    expr = " ".join(text.split())
    if not expr:
        raise ConfigError(message="schedule '': empty calendar expression")
    parser = _Cron(text) if expr.startswith("@") or len(expr.split()) == 5 else _Systemd(text)
    result = parser.parse(expr)
    probe = date(result.years[0] if result.years else 2000, 1, 1)
    if next(result._days(probe), None) is None:
        raise ConfigError(message=f"schedule {text!r}: never matches a date")
    return result


class _Parser:
    range_sep = ".."

    def __init__(self, text: str) -> None:
        self.text = text

    def error(self, why: str, token: str) -> ConfigError:
        return ConfigError(message=f"schedule {self.text!r}: {why} {token!r}")

    def number(self, token: str, what: str, names: dict[str, int] | None = None) -> int:
        if names is not None and token.lower() in names:
            return names[token.lower()]
        if not token.isdigit():
            raise self.error(f"not a {what}:", token)
        return int(token)

    def field(
        self,
        token: str,
        what: str,
        lo: int,
        hi: int,
        names: dict[str, int] | None = None,
        wrap: bool = False,
    ) -> tuple[int, ...]:
        """``*``, ``n``, ``a<sep>b``, each optionally ``/step``; comma lists of those."""
        values: set[int] = set()
        for item in token.split(","):
            base, slash, step_text = item.partition("/")
            if not base:
                raise self.error(f"empty {what} in", token)
            step = 1
            if slash:
                step = self.number(step_text, "step", None)
                if step < 1:
                    raise self.error("step must be at least 1:", item)
            if base == "*":
                first, last = lo, hi
            elif self.range_sep in base:
                a, _, b = base.partition(self.range_sep)
                first, last = self.number(a, what, names), self.number(b, what, names)
            else:
                first = self.number(base, what, names)
                last = hi if slash else first
            for v in (first, last):
                if not lo <= v <= hi:
                    raise self.error(f"{what} out of range {lo}..{hi}:", item)
            if first > last:
                if not wrap:
                    raise self.error("range goes backwards:", item)
                span = list(range(first, hi + 1)) + list(range(lo, last + 1))
                values.update(span[::step])
            else:
                values.update(range(first, last + 1, step))
        return tuple(sorted(values))


class _Systemd(_Parser):
    def parse(self, expr: str) -> Calendar:
        tokens = expr.split()
        weekdays: frozenset[int] = frozenset(range(7))
        date_text, time_text = "*-*-*", "00:00:00"
        head = tokens[0].lower()
        if head in _SHORTCUTS:
            date_text, time_text = _SHORTCUTS[head]
            if head == "weekly":
                weekdays = frozenset({0})
            rest = tokens[1:]
            if rest and head in ("minutely", "hourly"):
                raise self.error(f"{head} takes no time or date:", rest[0])
            if len(rest) > 1 or (rest and ":" not in rest[0]):
                raise self.error(f"{head} may only be followed by a time HH:MM[:SS], got", rest[0])
            if rest:
                time_text = rest[0]
            tokens = []
        elif tokens[0][:1].isalpha():
            weekdays = frozenset(self.field(tokens[0], "weekday", 0, 6, _WEEKDAYS, wrap=True))
            tokens = tokens[1:]
        seen_date = seen_time = False
        for token in tokens:
            if ":" in token and not seen_time:
                time_text, seen_time = token, True
            elif "-" in token and not seen_time and not seen_date:
                date_text, seen_date = token, True
            else:
                raise self.error("unexpected token", token)
        years, months, days = self.date(date_text)
        hours, minutes, seconds = self.time(time_text)
        return Calendar(
            " ".join(self.text.split()), years, months, days, weekdays, hours, minutes, seconds
        )

    def field(
        self,
        token: str,
        what: str,
        lo: int,
        hi: int,
        names: dict[str, int] | None = None,
        wrap: bool = False,
    ) -> tuple[int, ...]:
        if what == "weekday":  # systemd also accepts the older "mon-fri"
            token = token.replace("-", "..")
        return super().field(token, what, lo, hi, names, wrap)

    def date(self, token: str) -> tuple[tuple[int, ...] | None, tuple[int, ...], tuple[int, ...]]:
        parts = token.split("-")
        if len(parts) == 2:
            parts = ["*", *parts]
        if len(parts) != 3:
            raise self.error("a date is Y-M-D or M-D, got", token)
        year, month, day = parts
        years = None if year == "*" else self.field(year, "year", MIN_YEAR, MAX_YEAR)
        return years, self.field(month, "month", 1, 12), self.field(day, "day", 1, 31)

    def time(self, token: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        parts = token.split(":")
        if len(parts) == 2:
            parts.append("00")
        if len(parts) != 3:
            raise self.error("a time is HH:MM[:SS], got", token)
        h, m, s = parts
        return (
            self.field(h, "hour", 0, 23),
            self.field(m, "minute", 0, 59),
            self.field(s, "second", 0, 59),
        )


class _Cron(_Parser):
    range_sep = "-"

    def parse(self, expr: str) -> Calendar:
        if expr.startswith("@"):
            if expr.lower() not in _CRON_MACROS:
                raise self.error("unknown macro", expr)
            expr = _CRON_MACROS[expr.lower()]
        fields = expr.split()
        if len(fields) != 5:
            raise self.error("cron needs 5 fields, got", expr)
        minute, hour, dom, month, dow = fields
        weekdays = frozenset((v - 1) % 7 for v in self.field(dow, "weekday", 0, 7, _CRON_WEEKDAYS))
        return Calendar(
            " ".join(self.text.split()),
            None,
            self.field(month, "month", 1, 12, _MONTHS),
            self.field(dom, "day", 1, 31),
            weekdays,
            self.field(hour, "hour", 0, 23),
            self.field(minute, "minute", 0, 59),
            (0,),
            either_day=not dom.startswith("*") and not dow.startswith("*"),
        )
