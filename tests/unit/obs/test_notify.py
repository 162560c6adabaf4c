"""Which events a job raises and whom they reach (the policy's ``notifications``), a job's
subject and body text, the message headers."""

from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path

from engine.config.models import SmtpSection
from engine.config.policy import Notifications
from engine.obs.notify import Notifier
from engine.obs.summary import DiskSummary, JobSummary, body, choose_event, events_of, subject

START = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
END = datetime(2026, 11, 28, 2, 10, 5, tzinfo=UTC)


def summary(state: str = "failed", integrity: bool = False, **kw: object) -> JobSummary:
    fields: dict[str, object] = {
        "job_id": "j-123",
        "kind": "backup",
        "vm": "vm01",
        "state": state,
        "started": START,
        "finished": END,
        "integrity": integrity,
    } | kw
    return JobSummary(**fields)  # type: ignore[arg-type]


def test_choose_event_follows_the_policy() -> None:
    default = Notifications(to=("ops@example.org",))  # on: failure, integrity
    assert choose_event(default, summary("failed")) == "failure"
    assert choose_event(default, summary("succeeded")) is None
    assert choose_event(default, summary("cancelled")) is None
    assert choose_event(default, summary("failed", integrity=True)) == "integrity"
    assert choose_event(default, summary("succeeded", integrity=True)) == "integrity"
    everything = Notifications(on=("success", "failure", "integrity"), to=("a@b.c",))
    assert choose_event(everything, summary("succeeded")) == "success"
    only_success = Notifications(on=("success",), to=("a@b.c",))
    assert choose_event(only_success, summary("failed", integrity=True)) is None
    nobody = Notifications(on=("failure",))
    assert choose_event(nobody, summary("failed")) is None


def test_a_success_with_warnings_raises_warning_then_success() -> None:
    warned = summary("succeeded", warnings=("disk data: bitmap missing",))
    assert events_of(warned) == ("warning", "success")
    assert events_of(summary("succeeded")) == ("success",)
    assert events_of(summary("failed", warnings=("x",))) == ("failure",)
    assert choose_event(Notifications(on=("warning",), to=("a@b.c",)), warned) == "warning"
    assert choose_event(Notifications(on=("success",), to=("a@b.c",)), warned) == "success"
    assert choose_event(Notifications(to=("a@b.c",)), warned) is None  # default: failures
    assert subject(warned, "warning") == "[tessera] backup of vm01 succeeded with warnings"


def test_subjects() -> None:
    assert subject(summary(), "failure") == "[tessera] backup of vm01 FAILED"
    assert subject(summary("succeeded"), "success") == "[tessera] backup of vm01 succeeded"
    assert subject(summary(), "integrity") == "[tessera] backup of vm01 INTEGRITY ERROR"
    verify = summary(kind="verify", vm=None)
    assert subject(verify, "failure") == "[tessera] verify j-123 FAILED"


def test_body_carries_the_summary() -> None:
    text = body(
        summary(
            level="incremental",
            policy="nightly",
            bytes_read=3 * 2**30,
            bytes_stored=2**20,
            disks=(
                DiskSummary("os", 2**30, 2**19, new_chunks=7, read="dirty"),
                DiskSummary("data", 2 * 2**30, 2**19, read="full", note="bitmap missing"),
            ),
            error="disk data: connection reset\nafter 3 retries",
        )
    )
    lines = text.splitlines()
    assert "Job:      j-123" in lines
    assert "Kind:     backup" in lines
    assert "VM:       vm01" in lines
    assert "Level:    incremental" in lines
    assert "State:    failed" in lines
    assert "Started:  2026-11-28 02:00:00+00:00" in lines
    assert "Finished: 2026-11-28 02:10:05+00:00" in lines
    assert "Duration: 0:10:05" in lines
    assert "Read:     3.0 GiB (3221225472 bytes)" in lines
    assert "Stored:   1.0 MiB (1048576 bytes)" in lines
    assert "  os: read 1.0 GiB, stored 512.0 KiB, new chunks 7, dirty read" in lines
    assert "  data: read 2.0 GiB, stored 512.0 KiB, new chunks 0, full read; bitmap missing" in (
        lines
    )
    assert lines[-3:] == ["Error:", "  disk data: connection reset", "  after 3 retries"]


def test_message_headers(tmp_path: Path) -> None:
    smtp = SmtpSection(host="127.0.0.1", sender="tessera@example.org", port=2525)
    notifier = Notifier(smtp, local_hostname="dm01.example.org")
    msg = notifier.message(summary(), ["a@example.org", "b@example.org"], "failure")
    parsed = message_from_bytes(msg.as_bytes())
    assert parsed["From"] == "tessera@example.org"
    assert parsed["To"] == "a@example.org, b@example.org"
    assert parsed["Subject"] == "[tessera] backup of vm01 FAILED"
    assert parsed["X-Tessera-Job"] == "j-123"
    assert parsed["Message-ID"].endswith("@dm01.example.org>")
    assert parsed.get_content_type() == "text/plain"
