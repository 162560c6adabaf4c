"""``engine.jobs.history``: finished jobs kept beside the catalog, read back newest first,
filtered by time and outcome; a damaged or unwritable history never fails a job."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.jobs.history import INTERRUPTED, JobHistory, newest
from engine.jobs.journal import JobRecord
from engine.jobs.states import State

T0 = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)


def job(job_id: str, state: str, minutes: int, vm: str = "web01", **extra: Any) -> dict[str, Any]:
    at = (T0 + timedelta(minutes=minutes)).isoformat(timespec="seconds")
    return {
        "job_id": job_id,
        "kind": "backup",
        "vm": vm,
        "policy": "nightly",
        "state": state,
        "created": at,
        "started": at,
        "finished": at,
        "error": None if state == "succeeded" else "boom",
        "params": {"store": "main", "level": "full"},
        "summary": {"snapshot": f"s-{job_id}", "bytes_read": 42},
    } | extra


def test_jobs_come_back_newest_first_with_their_params_and_summary(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    for j in (job("a", "succeeded", 0), job("b", "failed", 10), job("c", "succeeded", 20)):
        assert h.record(j)
    h.close()
    again = JobHistory(tmp_path / "history.db")  # a new daemon
    docs = again.jobs()
    assert [d["job_id"] for d in docs] == ["c", "b", "a"]
    assert docs[1] == job("b", "failed", 10)
    assert [d["job_id"] for d in again.jobs(failed=True)] == ["b"]
    assert [d["job_id"] for d in again.jobs(since=T0 + timedelta(minutes=10))] == ["c", "b"]
    assert [d["job_id"] for d in again.jobs(limit=1)] == ["c"]


def test_jobs_that_end_in_one_second_keep_the_order_they_ended_in(tmp_path: Path) -> None:
    # Job ids sort by second, then by a random suffix: "z…" may well end before "a…".
    one = JobHistory(tmp_path / "one.db")
    for job_id in ("20261201T020000-zz", "20261201T020000-mm", "20261201T020000-aa"):
        one.record(job(job_id, "succeeded", 0))
    ended = ["20261201T020000-aa", "20261201T020000-mm", "20261201T020000-zz"]  # newest first
    assert [d["job_id"] for d in one.jobs()] == ended
    assert [d["job_id"] for d in newest([one, JobHistory(tmp_path / "two.db")])] == ended


def test_last_success_per_vm_is_the_newest_succeeded_job(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    h.record(job("a", "succeeded", 0))
    h.record(job("b", "succeeded", 30))
    h.record(job("c", "failed", 60))
    h.record(job("d", "succeeded", 5, vm="db01"))
    assert h.last_success() == {
        "web01": T0 + timedelta(minutes=30),
        "db01": T0 + timedelta(minutes=5),
    }


def test_recording_a_job_again_replaces_it(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    h.record(job("a", "failed", 0))
    h.record(job("a", "succeeded", 0))
    assert [d["state"] for d in h.jobs()] == ["succeeded"]


def test_histories_of_several_stores_merge_newest_first(tmp_path: Path) -> None:
    one, two = JobHistory(tmp_path / "one.db"), JobHistory(tmp_path / "two.db")
    one.record(job("a", "succeeded", 0))
    two.record(job("b", "succeeded", 5))
    one.record(job("c", "succeeded", 10))
    assert [d["job_id"] for d in newest([one, two])] == ["c", "b", "a"]
    assert [d["job_id"] for d in newest([one, two], limit=2)] == ["c", "b"]


def test_a_damaged_history_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"this is not a database" * 100)
    h = JobHistory(path)
    assert h.jobs() == []
    assert h.record(job("a", "succeeded", 0))
    assert [d["job_id"] for d in h.jobs()] == ["a"]
    (aside,) = tmp_path.glob("history.db.damaged-*")
    assert aside.read_bytes().startswith(b"this is not a database")


def test_a_history_that_cannot_be_written_loses_the_row_not_the_job(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.mkdir()  # where the file should be: every open fails
    h = JobHistory(path)
    assert h.record(job("a", "succeeded", 0)) is False
    assert h.jobs() == []
    assert h.last_success() == {}


# -- jobs killed with their daemon ----------------------------------------------------------

RESTART = T0 + timedelta(hours=2)


def started(job_id: str, minutes: int, kind: str = "backup") -> dict[str, Any]:
    at = (T0 + timedelta(minutes=minutes)).isoformat(timespec="seconds")
    return {
        "job_id": job_id,
        "kind": kind,
        "vm": "web01",
        "policy": "nightly",
        "created": at,
        "started": at,
        "params": {"store": "main"},
    }


def no_journal(job_id: str) -> JobRecord | None:
    return None


def test_a_finished_job_leaves_no_running_row(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    assert h.started(started("a", 0))
    assert [r["job_id"] for r in h.running()] == ["a"]
    assert h.record(job("a", "succeeded", 5))
    assert h.running() == []
    assert h.finish_interrupted(no_journal, RESTART) == []
    assert [d["state"] for d in h.jobs()] == ["succeeded"]


def test_a_job_its_daemon_stopped_becomes_an_interrupted_failed_row(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    h.record(job("ok", "succeeded", 0))
    h.started(started("gc1", 10, kind="gc"))
    h.alive(T0 + timedelta(minutes=31))  # the daemon's heartbeat, then it died
    h.close()
    again = JobHistory(tmp_path / "history.db")  # the next daemon
    (row,) = again.finish_interrupted(no_journal, RESTART)
    assert again.running() == []
    (doc, _) = again.jobs()
    assert doc == row
    assert (doc["job_id"], doc["kind"], doc["state"]) == ("gc1", "gc", "failed")
    assert doc["started"] == "2026-12-01T02:10:00+00:00"
    assert doc["finished"] == "2026-12-01T02:31:00+00:00"  # its last sign of life
    assert doc["error"] == (
        f"{INTERRUPTED}; it was last seen running at 2026-12-01T02:31:00+00:00, the restart "
        "at 2026-12-01T04:00:00+00:00 found it"
    )
    assert doc["summary"]["interrupted"]["found_at_restart"] == "2026-12-01T04:00:00+00:00"
    assert again.last_success() == {"web01": T0}  # a failure: the last success stays
    assert [d["job_id"] for d in again.jobs(failed=True)] == ["gc1"]


def test_an_interrupted_row_says_what_the_journal_recovery_did(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    h.started(started("b1", 0))
    record = JobRecord("b1", "backup", "ovirt", state=State.FAILED)
    record.error = "interrupted: process 4242 died while transferring"
    record.summary["recovered"] = {
        "was": "transferring",
        "last_saved": "2026-12-01T02:20:00.123+00:00",  # after the start: the later sign
        "pid": 4242,
        "actions": ["cancelled transfer t1", "removed snapshot s1"],
    }
    (row,) = h.finish_interrupted({"b1": record}.get, RESTART)
    assert row["state"] == "failed"
    assert row["finished"] == "2026-12-01T02:20:00+00:00"
    assert row["error"].startswith(INTERRUPTED)
    assert "(backup was transferring; the job journal's recovery ended it)" in row["error"]
    assert "process 4242" not in row["error"]  # recovery's own line says less
    facts = row["summary"]["interrupted"]
    assert facts["recovery"] == ["cancelled transfer t1", "removed snapshot s1"]


def test_a_backup_recovery_found_committed_is_a_success(tmp_path: Path) -> None:
    h = JobHistory(tmp_path / "history.db")
    h.record(job("old", "succeeded", 0))
    h.started(started("b2", 10))
    record = JobRecord("b2", "backup", "ovirt", state=State.SUCCEEDED)
    record.summary["recovered"] = {
        "was": "committing",
        "last_saved": "2026-12-01T02:40:00.000+00:00",
        "actions": ["dropped checkpoint c0"],
    }
    (row,) = h.finish_interrupted({"b2": record}.get, RESTART)
    assert (row["state"], row["error"]) == ("succeeded", None)
    assert INTERRUPTED in row["summary"]["interrupted"]["note"]
    assert h.last_success() == {"web01": T0 + timedelta(minutes=40)}


def test_a_job_that_ended_just_before_the_stop_takes_its_end_from_the_journal(
    tmp_path: Path,
) -> None:
    """The daemon died after the job's last journal save but before its history row."""
    h = JobHistory(tmp_path / "history.db")
    h.started(started("r1", 0, kind="restore"))
    record = JobRecord("r1", "restore", "ovirt", state=State.FAILED)
    record.error = "disk d1 at offset 0: EIO"
    record.updated = "2026-12-01T02:05:00.500+00:00"
    (row,) = h.finish_interrupted({"r1": record}.get, RESTART)
    assert (row["state"], row["error"]) == ("failed", "disk d1 at offset 0: EIO")
    assert row["finished"] == "2026-12-01T02:05:00+00:00"
    assert row["summary"]["interrupted"]["note"].startswith(
        "the daemon stopped after the job ended at 2026-12-01T02:05:00+00:00"
    )
