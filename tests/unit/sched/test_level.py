"""The level decision: first full, full days, full every N, else the default."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from engine.config.policy import LevelRules
from engine.config.types import Duration
from engine.sched.level import choose_level

SUN = datetime(2025, 1, 12, 2, 0, tzinfo=UTC)  # a Sunday
MON = SUN + timedelta(days=1)


@pytest.mark.parametrize(
    ("kwargs", "level", "reason"),
    [
        ({"last_full": None, "now": MON}, "full", "no full backup yet"),
        ({"default": "full", "last_full": SUN, "now": MON}, "full", "the policy's level is full"),
        ({"last_full": SUN, "now": MON}, "incremental", "last full 1d ago"),
        (
            {"default": "differential", "last_full": SUN, "now": MON},
            "differential",
            "last full 1d ago",
        ),
        (
            {"full_on": {6}, "last_full": SUN - timedelta(days=7), "now": SUN},
            "full",
            "full backups on sun",
        ),
        (
            {"full_on": {6}, "last_full": SUN - timedelta(hours=1), "now": SUN},
            "incremental",
            "last full 1h ago",
        ),
        (
            {"full_every": timedelta(days=7), "last_full": MON - timedelta(days=7), "now": MON},
            "full",
            "last full 7d ago (full every 7d)",
        ),
        (  # a run that starts a few seconds early still makes its weekly full
            {
                "full_every": timedelta(days=7),
                "last_full": MON - timedelta(days=7),
                "now": MON - timedelta(seconds=5),
            },
            "full",
            "last full 6d23h59m ago (full every 7d)",
        ),
        (
            {"full_every": timedelta(days=7), "last_full": MON - timedelta(days=6), "now": MON},
            "incremental",
            "last full 6d ago",
        ),
    ],
)
def test_choose_level(kwargs: dict[str, object], level: str, reason: str) -> None:
    args: dict[str, object] = {"default": "incremental", **kwargs}
    decision = choose_level(**args)  # type: ignore[arg-type]
    assert (decision.level, decision.reason) == (level, reason)


def test_full_days_are_read_in_the_policy_zone() -> None:
    rules = LevelRules(full_on=("mon",), full_every=Duration("30d"))
    sunday_night_utc = datetime(2025, 1, 12, 23, 30, tzinfo=UTC)  # Monday 00:30 in Berlin
    last = sunday_night_utc - timedelta(days=2)
    assert rules.decide(last, sunday_night_utc).level == "incremental"
    assert rules.decide(last, sunday_night_utc, ZoneInfo("Europe/Berlin")).level == "full"
