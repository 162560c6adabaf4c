"""The scheduler's memory across restarts: per policy, the last fire time it dealt with
(started or skipped) and the last one it started, in a small JSON file published
atomically (``engine.util.fs.atomic_write``), so a restarted daemon can tell which fire
times passed while it was down."""

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.core.errors import ConfigError
from engine.util.fs import atomic_write

VERSION = 1


@dataclass(frozen=True, slots=True)
class PolicyState:
    last_fire: datetime | None = None  # the last planned time handled (started or skipped)
    last_started: datetime | None = None  # the planned time of the last run started


class ScheduleState:
    """Loaded once; ``record`` rewrites the whole file (it holds one line per policy).
    Without a path nothing is persisted (tests, ``check-config``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._policies: dict[str, PolicyState] = {}
        if path is not None and path.exists():
            self._policies = _read(path)

    def get(self, name: str) -> PolicyState:
        return self._policies.get(name, PolicyState())

    def record(self, name: str, fire: datetime, started: bool) -> None:
        """Remember a handled fire; durable when this returns. Written on the event loop on
        purpose: a few hundred bytes once per fire, and no await between the decision and
        its record for a cancellation to land in."""
        old = self.get(name)
        self._policies[name] = PolicyState(fire, fire if started else old.last_started)
        if self.path is None:
            return
        doc = {
            "version": VERSION,
            "policies": {
                n: {
                    "last_fire": _iso(s.last_fire),
                    "last_started": _iso(s.last_started),
                }
                for n, s in sorted(self._policies.items())
            },
        }
        data = (json.dumps(doc, indent=1) + "\n").encode()
        atomic_write(self.path, data, "sched.state")


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def _read(path: Path) -> dict[str, PolicyState]:
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != VERSION:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        return {
            name: PolicyState(
                *(
                    datetime.fromisoformat(entry[key]) if entry.get(key) else None
                    for key in ("last_fire", "last_started")
                )
            )
            for name, entry in doc["policies"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            message=f"{path}: unreadable scheduler state ({e}); remove it to start afresh "
            "(missed runs during the last downtime will not be caught up)"
        ) from e
