"""Which backup level one VM gets from a scheduled run: the policy's level rules applied to
the VM's history (when its last full backup was).

Rules, first match wins:

1. no full backup yet → ``full``;
2. the policy's default level is ``full`` → ``full``;
3. today (in the policy's zone) is one of the ``full_on`` weekdays and the last full was not
   taken today → ``full``;
4. the last full is at least ``full_every`` old (minus ``FULL_EVERY_SLACK``) → ``full``;
5. otherwise the default, ``incremental`` (changes since the previous backup) or
   ``differential`` (changes since the last full).
"""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Literal

Level = Literal["full", "incremental", "differential"]
LEVELS: tuple[Level, ...] = ("full", "incremental", "differential")
WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# A daily run starts a few seconds later or earlier each day; without slack "full every 7d"
# would slip to day 8 whenever the run a week later starts a second earlier than the last.
FULL_EVERY_SLACK = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class LevelDecision:
    level: Level
    reason: str


def choose_level(
    *,
    default: Level,
    last_full: datetime | None,
    now: datetime,
    full_every: timedelta | None = None,
    full_on: Collection[int] = (),
    tz: tzinfo | None = None,
) -> LevelDecision:
    """Apply the rules above. ``now`` and ``last_full`` are aware; ``full_on`` holds
    weekdays (0 = Monday) read in ``tz`` (default: ``now``'s zone)."""
    if last_full is None:
        return LevelDecision("full", "no full backup yet")
    if default == "full":
        return LevelDecision("full", "the policy's level is full")
    zone = tz if tz is not None else now.tzinfo
    today = now.astimezone(zone)
    if today.weekday() in full_on and last_full.astimezone(zone).date() != today.date():
        return LevelDecision("full", f"full backups on {WEEKDAY_NAMES[today.weekday()]}")
    age = now - last_full
    if full_every is not None and age >= full_every - FULL_EVERY_SLACK:
        return LevelDecision(
            "full", f"last full {_human(age)} ago (full every {_human(full_every)})"
        )
    return LevelDecision(default, f"last full {_human(age)} ago")


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [
        f"{days}d" if days else "",
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
    ]
    return "".join(parts) or f"{seconds}s"
