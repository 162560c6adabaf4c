"""``engine.jobs.history``: finished jobs kept beside the catalog, read back newest first,
filtered by time and outcome; a damaged or unwritable history never fails a job."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.jobs.history import JobHistory, newest

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
