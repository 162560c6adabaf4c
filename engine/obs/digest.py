"""The digest of one policy run (pure): every VM the run took, how each ended, sizes,
durations, warnings and errors — one mail and one webhook call per run instead of one per VM.

The daemon fills a ``RunSummary`` when a policy run ends (its jobs' ``JobSummary``, plus
what went wrong outside a job: ``problems``, e.g. the engine could not list VMs, a VM's
backup could not start; ``warnings``, e.g. the selection matched no VM). ``run_events``
says which events the run raises and ``choose_run_event`` which one the policy's rules
want; ``subject``, ``body`` and ``document`` are the mail's subject, its plain text and
the webhooks' JSON document, ``notice`` all of them as one ``Notice``.

A run raises, most important first: ``integrity`` (a job found stored data wrong),
``failure`` (a job failed, or a problem outside the jobs), ``warning`` (a job succeeded
with warnings, or a run warning), ``success`` (nothing failed and at least one job
succeeded). A run whose every job was cancelled raises nothing.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine.core.units import human_bytes
from engine.obs.summary import (
    DOC_VERSION,
    EVENTS,
    SUBJECT_PREFIX,
    Event,
    JobSummary,
    Notice,
    NotificationRules,
    events_of,
    job_doc,
    outcome,
)

NAMES_IN_SUBJECT = 3  # VMs named in a subject; more are counted ("+2 more")


@dataclass(frozen=True)
class RunSummary:
    policy: str
    started: datetime
    finished: datetime
    jobs: tuple[JobSummary, ...]  # the run's backups, in the order the VMs were selected
    host: str = "-"  # the DataMover that ran it
    problems: tuple[str, ...] = ()  # failures outside a job: the run failed
    warnings: tuple[str, ...] = ()  # warnings outside a job

    @property
    def duration(self) -> timedelta:
        return self.finished - self.started

    def with_state(self, *states: str) -> list[JobSummary]:
        return [job for job in self.jobs if job.state in states]

    @property
    def warned(self) -> list[JobSummary]:
        return [j for j in self.jobs if j.state == "succeeded" and j.warnings]


def run_events(run: RunSummary) -> tuple[Event, ...]:
    """The events the run raises, most important first (module docstring)."""
    raised = {event for job in run.jobs for event in events_of(job)}
    if run.problems:
        raised.add("failure")
    if run.warnings:
        raised.add("warning")
    if raised & {"integrity", "failure"}:
        raised.discard("success")
    return tuple(event for event in EVENTS if event in raised)


def choose_run_event(rules: NotificationRules, run: RunSummary) -> Event | None:
    """The most important event of the run that the rules listen to; None when they want
    none of them."""
    return next((event for event in run_events(run) if event in rules.on), None)


def label(job: JobSummary) -> str:
    """The job's name in a digest: its VM, with the kind when it is not a backup (a
    policy's replications are in its run too)."""
    name = job.vm or job.job_id
    return name if job.kind == "backup" else f"{name} ({job.kind})"


def _names(jobs: list[JobSummary]) -> str:
    names = [label(job) for job in jobs]
    shown = ", ".join(names[:NAMES_IN_SUBJECT])
    more = len(names) - NAMES_IN_SUBJECT
    return shown + (f" +{more} more" if more > 0 else "")


def title(run: RunSummary) -> str:
    """The subject without its prefix: what happened, the failed VMs named."""
    head = f"policy {run.policy}:"
    if len(run.jobs) == 1 and not run.problems and not run.warnings:
        (job,) = run.jobs
        return f"{head} {label(job)} {outcome(job)}"
    total = len(run.jobs)
    unit = "VM" if all(job.kind == "backup" for job in run.jobs) else "job"
    vms = f"{total} {unit}{'s' if total != 1 else ''}"
    parts = []
    integrity = [job for job in run.jobs if job.integrity]
    if integrity:
        parts.append(f"INTEGRITY ERROR ({_names(integrity)})")
    failed = run.with_state("failed")
    if failed:
        parts.append(f"{len(failed)} of {vms} FAILED ({_names(failed)})")
    if run.problems:
        parts.append("run FAILED")
    if not parts:
        succeeded = run.with_state("succeeded")
        if len(succeeded) == total and total:
            parts.append(f"all {vms} succeeded")
        else:
            parts.append(f"{len(succeeded)} of {vms} succeeded")
    if run.warned:
        parts.append(f"{len(run.warned)} with warnings")
    elif run.warnings:
        parts.append("warnings")
    return f"{head} {', '.join(parts)}"


def subject(run: RunSummary) -> str:
    return f"{SUBJECT_PREFIX} {title(run)}"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


def _duration(delta: timedelta | None) -> str:
    return str(delta - timedelta(microseconds=delta.microseconds)) if delta is not None else "-"


def _vm_line(job: JobSummary) -> str:
    """One VM's outcome, level, sizes and duration (a digest row, a webhook fact)."""
    parts = [outcome(job)]
    if job.level:
        parts.append(job.level)
    if job.state == "succeeded" or job.bytes_read:
        parts.append(f"read {human_bytes(job.bytes_read)}, stored {human_bytes(job.bytes_stored)}")
    parts.append(_duration(job.duration))
    return ", ".join(parts)


def body(run: RunSummary) -> str:
    """The digest's plain text: the run, a row per VM, then errors, warnings and job ids."""
    counts = {
        "failed": len(run.with_state("failed")),
        "succeeded": len(run.with_state("succeeded")),
        "with warnings": len(run.warned),
        "cancelled": len(run.with_state("cancelled")),
    }
    rows = [
        ("Policy", run.policy),
        ("Host", run.host),
        ("Started", _when(run.started)),
        ("Finished", _when(run.finished)),
        ("Duration", _duration(run.duration)),
        ("Jobs", f"{len(run.jobs)}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)),
        ("Read", human_bytes(sum(job.bytes_read for job in run.jobs))),
        ("Stored", human_bytes(sum(job.bytes_stored for job in run.jobs))),
    ]
    lines = [f"{name + ':':<10}{value}" for name, value in rows]
    if run.jobs:
        width = max(len(label(job)) for job in run.jobs)
        lines += ["", "Per VM:"]
        lines += [f"  {label(job):<{width}}  {_vm_line(job)}" for job in run.jobs]
    errors = [f"{label(job)}: {job.error}" for job in run.jobs if job.error]
    if run.problems or errors:
        lines += ["", "Errors:", *(f"  {e}" for e in (*run.problems, *errors))]
    warnings = [*run.warnings, *(f"{label(job)}: {w}" for job in run.jobs for w in job.warnings)]
    if warnings:
        lines += ["", "Warnings:", *(f"  {w}" for w in warnings)]
    if run.jobs:
        lines += ["", "Job IDs (tessera job ID):"]
        lines += [f"  {label(job)}: {job.job_id}" for job in run.jobs]
    return "\n".join(lines) + "\n"


def document(run: RunSummary, event: Event) -> dict[str, Any]:
    """The run as JSON data (the webhooks' ``json`` shape; ``docs/DESIGN.md`` §7 lists it)."""
    jobs = run.jobs
    return {
        "type": "tessera.policy_run",
        "version": DOC_VERSION,
        "event": event,
        "title": title(run),
        "host": run.host,
        "policy": run.policy,
        "started": run.started.isoformat(),
        "finished": run.finished.isoformat(),
        "duration_seconds": run.duration.total_seconds(),
        "counts": {
            "jobs": len(jobs),
            "succeeded": len(run.with_state("succeeded")),
            "warnings": len(run.warned),
            "failed": len(run.with_state("failed")),
            "cancelled": len(run.with_state("cancelled")),
            "integrity": sum(1 for job in jobs if job.integrity),
        },
        "bytes_read": sum(job.bytes_read for job in jobs),
        "bytes_stored": sum(job.bytes_stored for job in jobs),
        "jobs": [job_doc(job) for job in jobs],
        "problems": list(run.problems),
        "warnings": list(run.warnings),
    }


def notice(run: RunSummary, event: Event) -> Notice:
    """The digest as a ``Notice``: a fact per VM, errors and warnings as details."""
    facts = tuple((label(job), _vm_line(job)) for job in run.jobs)
    details = [*run.problems, *(f"{label(job)}: {job.error}" for job in run.jobs if job.error)]
    details += [*run.warnings, *(f"{label(job)}: {w}" for job in run.jobs for w in job.warnings)]
    return Notice(event, title(run), facts, tuple(details), body(run), document(run, event))
