"""Job history that survives restarts: every finished daemon job, one row, beside the store's
catalog (``<store>/history.db``, SQLite).

The journal (``journal``) holds what a job is doing, for recovery, and is done with it once
the job ended; the history holds what an operator looks at afterwards: kind, VM, policy,
final state, times, error, the job's parameters and the API's summary of its outcome. The
daemon appends a row when a job ends and reads the newest rows back at start, so ``tessera
jobs``, the API and the ``/metrics`` last-success gauges show the same jobs before and after
a restart.

Jobs killed with their daemon. A job that starts running gets a row in the ``running``
table (``started``) before it does anything, refreshed by the daemon's heartbeat while it
runs (``alive``: its ``seen`` time); ending it (``record``) moves it to ``jobs`` in one
transaction. A ``running`` row left at the next start belongs to a job whose daemon stopped
while it ran (SIGKILL, a crash, power loss). ``finish_interrupted`` turns each into a
finished row (``interrupted_row``), after the journal's recovery has run, reading the job's
journal record (same id) when it has one:

* recovery ended it: the record's final state (FAILED; SUCCEEDED when a backup's snapshot
  was committed; CANCELLED when it never started) and what recovery undid;
* it had ended in the dead daemon, which died before writing its row: the record's state
  and error, the end from the record;
* no record (maintenance jobs, replication, a job killed before its first save): FAILED.

The row ends at the job's last sign of life (its last heartbeat, or its record's last save
by the dead daemon), and its error (or, for a success, its summary's ``interrupted``) says
the daemon stopped while it ran, between that time and the restart that found it.

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
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from engine.jobs.journal import JobRecord
from engine.jobs.states import State

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
CREATE TABLE IF NOT EXISTS running (
    job_id   TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,
    vm       TEXT NOT NULL,
    policy   TEXT,
    created  TEXT NOT NULL,
    started  TEXT NOT NULL,
    seen     TEXT NOT NULL,
    params   TEXT NOT NULL
);
"""
FIELDS: Final = (
    "job_id", "kind", "vm", "policy", "state", "created", "started", "finished", "error",
    "params", "summary",
)  # fmt: skip
RUNNING_FIELDS: Final = ("job_id", "kind", "vm", "policy", "created", "started", "seen", "params")
INTERRUPTED: Final = "interrupted: the daemon stopped while the job ran"


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

    def _write(self, job_id: object, *statements: tuple[str, Sequence[Any]]) -> bool:
        """Run ``statements`` in one transaction; False when they could not be (logged)."""
        try:
            with self._lock:
                db = self._connect()
                db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        db.execute(sql, args)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            log.warning("history.write_failed", file=str(self.path), job=job_id, error=str(e))
            return False
        return True

    def record(self, job: Mapping[str, Any]) -> bool:
        """Append (or replace) a finished job: a dict of ``FIELDS`` as the API shows a job
        (``params`` and ``summary`` as dicts); its ``running`` row goes in the same
        transaction. False when it could not be written (logged)."""
        row = [job.get(f) for f in FIELDS]
        row[FIELDS.index("params")] = json.dumps(job.get("params") or {}, sort_keys=True)
        row[FIELDS.index("summary")] = json.dumps(job.get("summary") or {}, sort_keys=True)
        insert = (
            f"INSERT OR REPLACE INTO jobs ({', '.join(FIELDS)}) "
            f"VALUES ({', '.join('?' * len(FIELDS))})"
        )
        delete = "DELETE FROM running WHERE job_id = ?"
        return self._write(job.get("job_id"), (insert, row), (delete, [job.get("job_id")]))

    def started(self, job: Mapping[str, Any]) -> bool:
        """A job that starts running (``RUNNING_FIELDS`` but ``seen``, which is its
        ``started``; ``params`` as a dict): the row that says so if its daemon stops before
        ``record``. False when it could not be written (logged)."""
        doc = dict(job) | {"seen": job["started"]}
        row = [doc.get(f) for f in RUNNING_FIELDS]
        row[RUNNING_FIELDS.index("params")] = json.dumps(doc.get("params") or {}, sort_keys=True)
        insert = (
            f"INSERT OR REPLACE INTO running ({', '.join(RUNNING_FIELDS)}) "
            f"VALUES ({', '.join('?' * len(RUNNING_FIELDS))})"
        )
        return self._write(job.get("job_id"), (insert, row))

    def alive(self, when: datetime) -> bool:
        """The daemon's heartbeat: every running job was still running at ``when``."""
        seen = when.astimezone(UTC).isoformat(timespec="seconds")
        return self._write(None, ("UPDATE running SET seen = ?", [seen]))

    def running(self) -> list[dict[str, Any]]:
        """The ``running`` rows (``params`` as a dict), oldest first; [] when the history
        cannot be read (logged)."""
        sql = f"SELECT {', '.join(RUNNING_FIELDS)} FROM running ORDER BY started, job_id"
        try:
            with self._lock:
                rows = self._connect().execute(sql).fetchall()
        except (sqlite3.Error, OSError) as e:
            log.warning("history.read_failed", file=str(self.path), error=str(e))
            return []
        docs = [dict(zip(RUNNING_FIELDS, row, strict=True)) for row in rows]
        for doc in docs:
            doc["params"] = json.loads(doc["params"])
        return docs

    def finish_interrupted(
        self, journal: Callable[[str], JobRecord | None], now: datetime
    ) -> list[dict[str, Any]]:
        """At a daemon's start, before any job runs and after the journal's recovery: every
        ``running`` row a stopped daemon left becomes a finished row (``interrupted_row``,
        with ``journal(job_id)``: the job's journal record, or None). Returns those rows."""
        out = []
        for row in self.running():
            doc = interrupted_row(row, journal(row["job_id"]), now)
            if self.record(doc):
                out.append(doc)
        return out

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


def interrupted_row(
    running: Mapping[str, Any], record: JobRecord | None, now: datetime
) -> dict[str, Any]:
    """The finished row of a job whose daemon stopped while it ran (module docstring):
    ``running`` is its ``running`` row, ``record`` its journal record after the recovery at
    ``now`` (None: it has none)."""
    restart = now.astimezone(UTC).isoformat(timespec="seconds")
    last = str(running["seen"])
    state, error = State.FAILED.value, None
    facts: dict[str, Any] = {"last_seen": last, "found_at_restart": restart}
    recovered = record.summary.get("recovered") if record is not None else None
    if record is not None and record.finished and isinstance(recovered, Mapping):
        state, error = record.state.value, record.error
        last = max(last, _iso(recovered.get("last_saved")) or last)
        facts |= {"was": recovered.get("was"), "recovery": list(recovered.get("actions", []))}
    elif record is not None and record.finished:
        # It ended in the dead daemon, which stopped before writing this row.
        state, error = record.state.value, record.error
        last = max(last, _iso(record.updated) or last)
        facts["ended_before_the_stop"] = True
    note = f"{INTERRUPTED}; it was last seen running at {last}, the restart at {restart} found it"
    if facts.get("ended_before_the_stop"):
        note = (
            f"the daemon stopped after the job ended at {last}, before it recorded the "
            f"end; taken from the job journal at the restart at {restart}"
        )
    elif facts.get("was"):
        note += f" ({running['kind']} was {facts['was']}; the job journal's recovery ended it)"
    facts["note"] = note
    if state != State.SUCCEEDED.value and not facts.get("ended_before_the_stop"):
        # Recovery's own "interrupted: process … died while …" says less than the note.
        kept = error if error and not error.startswith("interrupted:") else None
        error = f"{note}; {kept}" if kept else note
    return {
        "job_id": running["job_id"],
        "kind": running["kind"],
        "vm": running["vm"],
        "policy": running["policy"],
        "state": state,
        "created": running["created"],
        "started": running["started"],
        "finished": last,
        "error": error,
        "params": running["params"],
        "summary": {"interrupted": facts},
    }


def _iso(text: object) -> str | None:
    """A journal time (milliseconds) in the history's form (seconds, UTC), or None."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).astimezone(UTC).isoformat(timespec="seconds")
    except ValueError:
        return None


def newest(histories: Sequence[JobHistory], **query: Any) -> list[dict[str, Any]]:
    """``JobHistory.jobs`` over several stores, merged newest first."""
    limit = query.get("limit")
    merged = [job for h in histories for job in h.jobs(**query)]
    # Stable: jobs of one second keep each store's order.
    merged.sort(key=lambda j: j["finished"], reverse=True)
    return merged[:limit] if limit is not None else merged
