"""How ``tessera`` shows a time to people: one rule, one formatter (``human_time``).

Human output shows a time in the local time zone of the machine running the command (``TZ``
is honoured), with its UTC offset: ``2026-12-07 11:10:21 +0100``. The offset makes every time
unambiguous and comparable across commands, whatever the zone. A command that works in a
zone of its own shows that zone instead, still with the offset: prune's calendar buckets
(``--tz``), and check-config's next runs (the scheduler's ``timezone:``). Machine output
(``--json``, the API) carries ISO 8601 times in UTC, as the store records them.
"""

from datetime import UTC, datetime, tzinfo
from typing import Final

FORMAT: Final = "%Y-%m-%d %H:%M:%S %z"
WIDTH: Final = 25  # len("2026-12-07 11:10:21 +0100"), for table columns


def human_time(when: datetime | str, tz: tzinfo | None = None) -> str:
    """``when`` (aware, or ISO 8601 text with an offset) in ``tz``, default the local zone.

    A naive time (none is recorded so) is taken as UTC, as the store writes its times."""
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(tz).strftime(FORMAT)
