"""What a person is told about a finished job (pure): ``JobSummary``, the events it raises,
whether a policy's rules want to hear of it, and its subject and plain-text body.

Events, most important first: ``integrity`` (stored data found wrong), ``failure``,
``warning`` (succeeded, with warnings), ``success``; a cancelled job raises none. The mail
(``engine.obs.notify``), the run digest (``engine.obs.digest``) and the webhooks
(``engine.obs.webhook``) all read these.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from engine.core.units import human_bytes

# config.policy.Event (obs sits below config), most important first.
Event = Literal["integrity", "failure", "warning", "success"]
EVENTS: tuple[Event, ...] = ("integrity", "failure", "warning", "success")
SUBJECT_PREFIX = "[tessera]"
DOC_VERSION = 1  # of the JSON documents (``job_doc``, the digest's, the test's)


class NotificationRules(Protocol):
    """``engine.config.policy.Notifications``: which events, to whom."""

    @property
    def on(self) -> Collection[str]: ...
    @property
    def to(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class DiskSummary:
    name: str
    bytes_read: int = 0
    bytes_stored: int = 0
    new_chunks: int = 0
    read: str | None = None  # "full" | "dirty" (backup), None elsewhere
    note: str | None = None  # e.g. the reason of a fallback to a full read
    error: str | None = None


@dataclass(frozen=True)
class JobSummary:
    """What a person needs to know about a finished job (the daemon fills it)."""

    job_id: str
    kind: str  # "backup", "restore", "replicate", "verify", ...
    vm: str | None  # None for jobs that are not about one VM
    state: str  # final state: "succeeded", "failed", "cancelled"
    started: datetime
    finished: datetime | None = None
    level: str | None = None  # backups: full / incremental / differential
    policy: str | None = None
    snapshot: str | None = None
    bytes_read: int = 0
    bytes_stored: int = 0
    disks: tuple[DiskSummary, ...] = ()
    notes: tuple[str, ...] = ()  # notes and warnings, each "kind: text"
    error: str | None = None
    integrity: bool = False  # stored data was found wrong (an IntegrityError)
    warnings: tuple[str, ...] = ()  # the warnings among the notes, without their kind

    @property
    def duration(self) -> timedelta | None:
        return self.finished - self.started if self.finished is not None else None


def events_of(summary: JobSummary) -> tuple[Event, ...]:
    """The events a finished job raises, most important first."""
    events: list[Event] = ["integrity"] if summary.integrity else []
    if summary.state == "failed":
        events.append("failure")
    elif summary.state == "succeeded":
        events += ["warning", "success"] if summary.warnings else ["success"]
    return tuple(events)  # a cancelled job was someone's choice: nothing to report


def choose_event(rules: NotificationRules, summary: JobSummary) -> Event | None:
    """The event to send mail about (the most important one the rules listen to), or None
    when the rules have no recipients or want none of the job's events."""
    if not rules.to:
        return None
    return next((event for event in events_of(summary) if event in rules.on), None)


def subject(summary: JobSummary, event: Event) -> str:
    what = f"{summary.kind} of {summary.vm}" if summary.vm else f"{summary.kind} {summary.job_id}"
    outcome = {
        "failure": "FAILED",
        "warning": "succeeded with warnings",
        "success": "succeeded",
        "integrity": "INTEGRITY ERROR",
    }
    return f"{SUBJECT_PREFIX} {what} {outcome[event]}"


def body(summary: JobSummary) -> str:
    def when(moment: datetime | None) -> str:
        return moment.isoformat(sep=" ", timespec="seconds") if moment is not None else "-"

    def size(n: int) -> str:
        return f"{human_bytes(n)} ({n} bytes)"

    rows = [
        ("Job", summary.job_id),
        ("Kind", summary.kind),
        ("VM", summary.vm or "-"),
        ("Policy", summary.policy or "-"),
        ("Level", summary.level or "-"),
        ("State", summary.state),
        ("Started", when(summary.started)),
        ("Finished", when(summary.finished)),
        ("Duration", str(summary.duration) if summary.duration is not None else "-"),
        ("Read", size(summary.bytes_read)),
        ("Stored", size(summary.bytes_stored)),
        ("Snapshot", summary.snapshot or "-"),
    ]
    lines = [f"{name + ':':<10}{value}" for name, value in rows]
    if summary.disks:
        lines += ["", "Disks:"]
        for disk in summary.disks:
            line = (
                f"  {disk.name}: read {human_bytes(disk.bytes_read)}, stored "
                f"{human_bytes(disk.bytes_stored)}, new chunks {disk.new_chunks}"
            )
            line += f", {disk.read} read" if disk.read else ""
            line += f"; {disk.note}" if disk.note else ""
            line += f"; error: {disk.error}" if disk.error else ""
            lines.append(line)
    if summary.notes:
        lines += ["", "Notes:", *(f"  {note}" for note in summary.notes)]
    if summary.error:
        lines += ["", "Error:", *(f"  {line}" for line in summary.error.splitlines())]
    return "\n".join(lines) + "\n"


def outcome(summary: JobSummary) -> str:
    """One word for how the job ended, as the digest and webhooks show it."""
    if summary.integrity:
        return "INTEGRITY ERROR"
    if summary.state == "failed":
        return "FAILED"
    if summary.state == "succeeded" and summary.warnings:
        return "succeeded with warnings"
    return summary.state


def job_doc(summary: JobSummary) -> dict[str, Any]:
    """The job as JSON data (webhooks' ``json`` shape): times ISO 8601, sizes in bytes,
    durations in seconds."""
    duration = summary.duration
    return {
        "job": summary.job_id,
        "kind": summary.kind,
        "vm": summary.vm,
        "policy": summary.policy,
        "state": summary.state,
        "outcome": outcome(summary),
        "integrity": summary.integrity,
        "level": summary.level,
        "snapshot": summary.snapshot,
        "started": summary.started.isoformat(),
        "finished": summary.finished.isoformat() if summary.finished else None,
        "duration_seconds": duration.total_seconds() if duration is not None else None,
        "bytes_read": summary.bytes_read,
        "bytes_stored": summary.bytes_stored,
        "warnings": list(summary.warnings),
        "error": summary.error,
    }


@dataclass(frozen=True)
class Delivery:
    """How one notification to one target went (``tessera notify test`` prints these)."""

    target: str  # "mail ops@example.org via smtp:587", "webhook ops-chat (slack)"
    ok: bool
    detail: str  # "sent", "HTTP 200", or the error


@dataclass(frozen=True)
class Notice:
    """One notification in the terms every webhook shape is built from
    (``engine.obs.webhook.payload``): a title, short facts (name, value), detail lines
    (errors, warnings), the plain text of the mail, and the JSON document."""

    event: Event | Literal["test"]
    title: str
    facts: tuple[tuple[str, str], ...]
    details: tuple[str, ...]
    text: str
    document: dict[str, Any]


def job_notice(summary: JobSummary, event: Event, host: str) -> Notice:
    """A job outside a policy run (maintenance) as a ``Notice``."""
    title = subject(summary, event).removeprefix(SUBJECT_PREFIX + " ")
    facts = [("State", summary.state)]
    if summary.duration is not None:
        facts.append(("Duration", str(summary.duration)))
    details = [f"error: {summary.error}"] if summary.error else []
    details += [f"warning: {w}" for w in summary.warnings]
    document = {"type": "tessera.job", "version": DOC_VERSION, "event": event}
    document |= {"title": title, "host": host, "job": job_doc(summary)}
    return Notice(event, title, tuple(facts), tuple(details), body(summary), document)
