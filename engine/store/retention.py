"""Object lock for a store in a bucket: the dates objects are kept until (issue 18).

A store made with ``--object-lock MODE --lock-for DURATION`` (``RemoteConfig.object_lock``,
``lock_seconds``) puts every object it writes to its bucket — packs, snapshots, the
configuration and the key file — with an S3 object lock retention in that mode
(``GOVERNANCE``: only a key with the bypass permission may shorten it, and Tessera never
sends the bypass; ``COMPLIANCE``: nobody can, not even the bucket's owner) and a date:

    date(t) = t + DURATION, rounded up to the next multiple of the generation
    generation = DURATION / GENERATIONS   (so 30 days: generations of 7.5 days)

Rounding to generations keeps the dates few: every object written in one generation is
kept until the same date, and a renewal moves a pack a whole generation on at once.

The promise, per snapshot: **every object a snapshot needs is locked until at least its
commit time + DURATION**. Its own objects (DiskMaps, manifest) get ``date(commit)``; a pack
it shares with older snapshots (deduplication) may hold an older date, so the commit renews
every pack of the snapshot whose date is before ``commit + DURATION`` to ``date(commit)``
(``PutObjectRetention``, one request per pack, at most once per generation per pack). Only
packs still referenced are ever renewed: one no snapshot needs keeps its last date and is
deleted by GC once it is past.

Dates are reckoned from ``S3Packs.clock`` (the wall clock; tests move it on), the bucket
enforces them by its own.

So: prune keeps a snapshot until its own date (and says which), GC deletes a retired pack
only after its date (and says which it waits for), and the bucket refuses a delete of a
locked version whatever our clock says (GC then keeps the pack's trash marker and retries).
"""

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

MODES: Final = ("GOVERNANCE", "COMPLIANCE")
GENERATIONS: Final = 4  # generations per lock duration
_DURATION: Final = re.compile(r"(\d+)\s*([smhdw]?)")
_UNIT: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class LockPolicy:
    mode: str  # one of MODES
    seconds: int  # the lock duration

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"object lock mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.seconds <= 0:
            raise ValueError(f"object lock duration {self.seconds} s: must be positive")

    @property
    def generation(self) -> float:
        return self.seconds / GENERATIONS

    def date(self, now: float) -> int:
        """The lock date (epoch seconds) of an object written or renewed at ``now``."""
        g = self.generation
        return math.ceil(math.ceil((now + self.seconds) / g) * g)

    def covers(self, until: int | None, now: float) -> bool:
        """Whether a lock until ``until`` keeps a snapshot committed at ``now`` safe."""
        return until is not None and until >= now + self.seconds


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds, as seconds;
    ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or int(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration (e.g. 30d, 12h, 90m, 45s)")
    return int(m.group(1)) * _UNIT[m.group(2)]


def describe_duration(seconds: int) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def when(epoch: int) -> str:
    """A lock date as people read it (UTC, to the second)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
