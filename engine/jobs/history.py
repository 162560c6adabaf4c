"""Job history that survives restarts: every finished daemon job, one row, beside the store's
catalog (``<store>/history.db``, SQLite).

The journal (``journal``) holds what a job is doing, for recovery, and is done with it once
the job ended; the history holds what an operator looks at afterwards: kind, VM, policy,
final state, times, error, the job's parameters and the API's summary of its outcome. The
daemon appends a row when a job ends and reads the newest rows back at start, so ``tessera
jobs``, the API and the ``/metrics`` last-success gauges show the same jobs before and after
a restart.

Failures never fail a job: the history is a record of jobs, not part of them. A history that
cannot be written (ENOSPC, EIO) is logged and the row is lost; a file that is not a readable
database is set aside as ``history.db.damaged-<time>`` with a warning, and a new one started
(the store's data and snapshots do not depend on it).

Every method blocks (SQLite): call them in a thread from the event loop.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

log = structlog.get_logger("tessera.jobs")

FILENAME: Final = "history.db"
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id   TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,
    vm       TEXT NOT NULL,
    policy   TEXT,
    state    TEXT NOT NULL,
    created  TEXT NOT NULL,
    started  TEXT,
    finished TEXT NOT NULL,
    error    TEXT,
    params   TEXT NOT NULL,
    summary  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
"""
FIELDS: Final = (
    "job_id", "kind", "vm", "policy", "state", "created", "started", "finished", "error",
    "params", "summary",
)  # fmt: skip


class JobHistory:
    """The finished jobs of one store (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError):
                    raise  # cannot open or write (a full disk, EIO): not damage
                aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
                log.warning(
                    "history.damaged", file=str(self.path), error=str(e), set_aside=str(aside)
                )
                self.path.rename(aside)
                self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            db.execute("SELECT count(*) FROM jobs").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def record(self, job: Mapping[str, Any]) -> bool:
        """Append (or replace) a finished job: a dict of ``FIELDS`` as the API shows a job
        (``params`` and ``summary`` as dicts). False when it could not be written (logged)."""
        row = [job.get(f) for f in FIELDS]
        row[FIELDS.index("params")] = json.dumps(job.get("params") or {}, sort_keys=True)
        row[FIELDS.index("summary")] = json.dumps(job.get("summary") or {}, sort_keys=True)
        try:
            with self._lock:
                self._connect().execute(
                    f"INSERT OR REPLACE INTO jobs ({', '.join(FIELDS)}) "
                    f"VALUES ({', '.join('?' * len(FIELDS))})",
                    row,
                )
        except (sqlite3.Error, OSError) as e:
            log.warning("history.write_failed", file=str(self.path), job=job.get("job_id"),
                        error=str(e))  # fmt: skip
            return False
        return True

    def jobs(
        self,
        *,
        since: datetime | None = None,
        failed: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Finished jobs, newest first: those that ended at or after ``since``, only those
        that did not succeed with ``failed``, at most ``limit``. A history that cannot be
        read gives ``[]`` (logged)."""
        where, args = [], []
        if since is not None:
            where.append("finished >= ?")
            args.append(since.astimezone(UTC).isoformat(timespec="seconds"))
        if failed:
            where.append("state != 'succeeded'")
        sql = f"SELECT {', '.join(FIELDS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        # Times are whole seconds; within one, the order rows were written in (ids sort by
        # second, then by a random suffix).
        sql += " ORDER BY finished DESC, rowid DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        try:
            with self._lock:
                rows = self._connect().execute(sql, args).fetchall()
        except (sqlite3.Error, OSError) as e:
            log.warning("history.read_failed", file=str(self.path), error=str(e))
            return []
        out = []
        for row in rows:
            doc = dict(zip(FIELDS, row, strict=True))
            doc["params"] = json.loads(doc["params"])
            doc["summary"] = json.loads(doc["summary"])
            out.append(doc)
        return out

    def last_success(self) -> dict[str, datetime]:
        """VM → when its newest succeeded job ended (the ``/metrics`` last-success gauge)."""
        sql = "SELECT vm, max(finished) FROM jobs WHERE state = 'succeeded' GROUP BY vm"
        try:
            with self._lock:
                rows = self._connect().execute(sql).fetchall()
        except (sqlite3.Error, OSError) as e:
            log.warning("history.read_failed", file=str(self.path), error=str(e))
            return {}
        return {vm: datetime.fromisoformat(finished) for vm, finished in rows}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def newest(histories: Sequence[JobHistory], **query: Any) -> list[dict[str, Any]]:
    """``JobHistory.jobs`` over several stores, merged newest first."""
    limit = query.get("limit")
    merged = [job for h in histories for job in h.jobs(**query)]
    # Stable: jobs of one second keep each store's order.
    merged.sort(key=lambda j: j["finished"], reverse=True)
    return merged[:limit] if limit is not None else merged
