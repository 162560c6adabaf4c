"""The fault-injection harness: inject ENOSPC or EIO at a named failpoint, count what
happened, and check the three things every case must show.

Failpoints (``engine.util.failpoints``) mark every write, fsync and rename of the store and
the journal; a write with a failpoint is split in two with the point between the halves, so a
fault there is a *torn* write (half the bytes on disk, then the error), the worst a full disk
does. ``Recorder`` runs an operation once to learn which points it passes and how often;
``Inject`` then raises at the chosen hit:

- points ending in ``.before_commit`` are SQLite commits: the fault is the
  ``sqlite3.OperationalError`` SQLite raises for a full disk or an I/O error;
- every other point raises ``OSError`` with the errno.

Each case then asserts the same three things (``Totals`` counts them for the closing note):

1. the operation failed with an error naming the store and the errno, or succeeded;
2. every snapshot reported committed restores byte-identical (none is lost);
3. verify names exactly what was damaged (after a write fault: nothing).
"""

import errno
import json
import os
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.util import failpoints

FAULTS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO}
SQLITE_TEXT = {"ENOSPC": "database or disk is full", "EIO": "disk I/O error"}
TOTALS_ENV = "TESSERA_FAULT_TOTALS"


class Recorder:
    """A failpoint handler that counts hits per name."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()

    def __call__(self, name: str) -> None:
        self.hits[name] += 1


@dataclass
class Inject:
    """Raise ``kind`` at the ``nth`` hit of ``point`` (once)."""

    point: str
    nth: int
    kind: str  # ENOSPC | EIO
    fired: bool = False
    seen: int = 0

    def __call__(self, name: str) -> None:
        if name != self.point or self.fired:
            return
        self.seen += 1
        if self.seen == self.nth:
            self.fired = True
            if self.point.endswith(".before_commit"):
                raise sqlite3.OperationalError(SQLITE_TEXT[self.kind])
            code = FAULTS[self.kind]
            raise OSError(code, os.strerror(code))


@contextmanager
def installed(handler: object) -> Iterator[None]:
    failpoints.install(handler)  # type: ignore[arg-type]
    try:
        yield
    finally:
        failpoints.install(None)


def chosen_hits(count: int) -> list[int]:
    """Which hits of a point to fault: the first, a middle one and the last."""
    return sorted({1, (count + 1) // 2, count})


def record_case(
    suite: str,
    case: str,
    *,
    injected: int = 1,
    detected: int,
    lost: int = 0,
    undetected: int = 0,
    committed: int = 0,
) -> None:
    """Append one case's counts to the run's totals (read by ``conftest``'s summary)."""
    directory = os.environ.get(TOTALS_ENV)
    if not directory:
        return
    line = {
        "suite": suite,
        "case": case,
        "injected": injected,
        "detected": detected,
        "lost": lost,
        "undetected": undetected,
        "committed": committed,
    }
    path = Path(directory) / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(line))


def read_totals(directory: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        suite = out.setdefault(
            doc["suite"],
            {"cases": 0, "injected": 0, "detected": 0, "lost": 0, "undetected": 0, "committed": 0},
        )
        suite["cases"] += 1
        for key in ("injected", "detected", "lost", "undetected", "committed"):
            suite[key] += doc[key]
    return out
