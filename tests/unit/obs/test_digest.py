"""The digest of a policy run (``engine.obs.digest``): which events a run raises, its
subject naming what failed, its text with a row per VM, its JSON document, its notice."""

import json
from datetime import UTC, datetime, timedelta

from engine.config.policy import Notifications
from engine.obs import digest
from engine.obs.digest import RunSummary, choose_run_event, run_events
from engine.obs.summary import DiskSummary, JobSummary

START = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
GiB = 2**30


def job(vm: str, state: str = "succeeded", minutes: int = 3, **kw: object) -> JobSummary:
    fields: dict[str, object] = {
        "job_id": f"j-{vm}",
        "kind": "backup",
        "vm": vm,
        "state": state,
        "started": START,
        "finished": START + timedelta(minutes=minutes, microseconds=120),
        "level": "incremental",
        "policy": "nightly",
    } | kw
    return JobSummary(**fields)  # type: ignore[arg-type]


def run(*jobs: JobSummary, **kw: object) -> RunSummary:
    fields: dict[str, object] = {
        "policy": "nightly",
        "started": START,
        "finished": START + timedelta(minutes=41, seconds=7),
        "jobs": jobs,
        "host": "dm01",
    } | kw
    return RunSummary(**fields)  # type: ignore[arg-type]


CLEAN = job("web01", bytes_read=GiB, bytes_stored=2**20, disks=(DiskSummary("os", GiB, 2**20),))
WARNED = job("web02", warnings=("disk data: bitmap missing, read in full",), level="full")
FAILED = job("db01", "failed", minutes=1, error="disk os: connection reset", level="full")


def test_run_events_and_the_rules() -> None:
    assert run_events(run(CLEAN)) == ("success",)
    assert run_events(run(CLEAN, WARNED)) == ("warning", "success")
    assert run_events(run(CLEAN, WARNED, FAILED)) == ("failure", "warning")
    assert run_events(run(CLEAN, job("x", "failed", integrity=True))) == ("integrity", "failure")
    assert run_events(run(CLEAN, problems=("db02: not started: busy",))) == ("failure",)
    assert run_events(run(warnings=("the selection matched none of the 4 VMs listed",))) == (
        "warning",
    )
    assert run_events(run(job("x", "cancelled"))) == ()
    default = Notifications(to=("ops@example.org",))  # on: failure, integrity
    assert choose_run_event(default, run(CLEAN, WARNED)) is None
    assert choose_run_event(default, run(CLEAN, FAILED)) == "failure"
    everything = Notifications(on=("success", "warning", "failure"), to=("a@b.c",))
    assert choose_run_event(everything, run(CLEAN, WARNED)) == "warning"
    assert choose_run_event(everything, run(CLEAN)) == "success"


def test_subjects_name_what_failed() -> None:
    assert digest.subject(run(CLEAN)) == "[tessera] policy nightly: web01 succeeded"
    assert digest.subject(run(FAILED)) == "[tessera] policy nightly: db01 FAILED"
    assert digest.subject(run(CLEAN, WARNED)) == (
        "[tessera] policy nightly: all 2 VMs succeeded, 1 with warnings"
    )
    assert digest.subject(run(CLEAN, WARNED, FAILED)) == (
        "[tessera] policy nightly: 1 of 3 VMs FAILED (db01), 1 with warnings"
    )
    many = [job(f"vm{i}", "failed") for i in range(5)]
    assert digest.subject(run(*many)) == (
        "[tessera] policy nightly: 5 of 5 VMs FAILED (vm0, vm1, vm2 +2 more)"
    )
    bad = job("db01", "failed", integrity=True)
    assert digest.subject(run(CLEAN, bad)) == (
        "[tessera] policy nightly: INTEGRITY ERROR (db01), 1 of 2 VMs FAILED (db01)"
    )
    replicated = job("web01", kind="replicate")
    assert digest.subject(run(CLEAN, replicated, problems=("x",))) == (
        "[tessera] policy nightly: run FAILED"
    )
    assert (
        digest.subject(run(CLEAN, replicated)) == "[tessera] policy nightly: all 2 jobs succeeded"
    )


def test_body_has_a_row_per_vm_then_errors_warnings_and_job_ids() -> None:
    text = digest.body(run(CLEAN, WARNED, FAILED, problems=("db02: not started: busy",)))
    lines = text.splitlines()
    assert lines[:8] == [
        "Policy:   nightly",
        "Host:     dm01",
        "Started:  2026-11-28T02:00:00+00:00",
        "Finished: 2026-11-28T02:41:07+00:00",
        "Duration: 0:41:07",
        "Jobs:     3: 1 failed, 2 succeeded, 1 with warnings",
        "Read:     1.0 GiB",
        "Stored:   1.0 MiB",
    ]
    per_vm = lines[lines.index("Per VM:") + 1 : lines.index("Per VM:") + 4]
    assert per_vm == [
        "  web01  succeeded, incremental, read 1.0 GiB, stored 1.0 MiB, 0:03:00",
        "  web02  succeeded with warnings, full, read 0 B, stored 0 B, 0:03:00",
        "  db01   FAILED, full, 0:01:00",
    ]
    assert "Errors:" in lines and "  db02: not started: busy" in lines
    assert "  db01: disk os: connection reset" in lines
    assert "  web02: disk data: bitmap missing, read in full" in lines
    assert lines[-3:] == ["  web01: j-web01", "  web02: j-web02", "  db01: j-db01"]


def test_document_is_json_with_iso_times_and_numbers() -> None:
    doc = digest.document(run(CLEAN, FAILED), "failure")
    assert json.loads(json.dumps(doc)) == doc
    assert doc["type"] == "tessera.policy_run" and doc["version"] == 1
    assert (doc["event"], doc["policy"], doc["host"]) == ("failure", "nightly", "dm01")
    assert doc["started"] == "2026-11-28T02:00:00+00:00"
    assert doc["duration_seconds"] == 2467.0
    assert doc["counts"] == {
        "jobs": 2,
        "succeeded": 1,
        "warnings": 0,
        "failed": 1,
        "cancelled": 0,
        "integrity": 0,
    }
    assert (doc["bytes_read"], doc["bytes_stored"]) == (GiB, 2**20)
    first, second = doc["jobs"]
    assert first["vm"] == "web01" and first["outcome"] == "succeeded"
    assert first["duration_seconds"] == 180.00012
    assert second["error"] == "disk os: connection reset" and second["warnings"] == []


def test_notice_has_a_fact_per_vm_and_the_problems_as_details() -> None:
    notice = digest.notice(run(CLEAN, FAILED), "failure")
    assert notice.title == "policy nightly: 1 of 2 VMs FAILED (db01)"
    assert [name for name, _ in notice.facts] == ["web01", "db01"]
    assert notice.details == ("db01: disk os: connection reset",)
    assert notice.text == digest.body(run(CLEAN, FAILED))
