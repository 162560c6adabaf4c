"""Scheduled store maintenance in the daemon: garbage collection, verify and restore checks.

``config.maintenance`` gives calendar expressions (``gc: "sun 03:00"``, ``verify: "sat
04:00"``, ``restore_check: "sun 05:00"``); each becomes a scheduled *task* with the same
scheduler rules as policies (no overlap, misfire grace, state file
``<scheduler state>-maintenance.json``). A run is a job of the ``JobManager`` (kind ``gc``
or ``verify``, its "VM" ``store:<name>``), so it shows in ``tessera jobs`` with its log and
summary, and it runs beside backups: GC honours the leases of running backups
(``engine.maint.gc``), verify reads a read-only view. A verify with findings or a failed
run is e-mailed to ``maintenance.notify``. A restore check run is one ``check`` job per VM
(``engine.daemon.checks.start_newest``: its newest snapshot).

The work runs in a thread (``engine.app.maintenance``: both are blocking, resumable store
walks); a daemon stop waits for
a running one to reach its next commit — both are safe to kill and resume.
"""

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from engine.app.maintenance import run_gc, run_verify, verify_lines
from engine.app.stores import JobStore
from engine.app.summaries import gc_doc, verify_doc
from engine.config.models import MaintenanceSection
from engine.core.errors import ConfigError
from engine.daemon import checks
from engine.daemon.context import DaemonContext
from engine.daemon.jobs import JobView
from engine.maint.gc import GcOptions
from engine.maint.verify import VerifyOptions
from engine.sched.calendar import Calendar

log = structlog.get_logger("tessera.maintenance")


@dataclass(frozen=True)
class Task:
    """What the scheduler needs (``name``, ``calendars``) plus what to run."""

    name: str  # "maintenance/gc"
    kind: str  # gc | verify | check
    calendars: tuple[Calendar, ...] = field(default_factory=tuple)


def tasks(section: MaintenanceSection) -> list[Task]:
    out = []
    if section.gc is not None:
        out.append(Task("maintenance/gc", "gc", (section.gc.calendar,)))
    if section.verify is not None:
        out.append(Task("maintenance/verify", "verify", (section.verify.calendar,)))
    if section.restore_check is not None:
        calendar = section.restore_check.calendar
        out.append(Task("maintenance/restore-check", "check", (calendar,)))
    return out


async def run_task(ctx: DaemonContext, task: Task) -> None:
    """One run of ``task`` on every store, as daemon jobs; returns when they have ended."""
    if task.kind == "check":
        views = [v for handle in ctx.stores.values() for v in checks.start_newest(ctx, handle)]
    else:
        views = [start(ctx, task.kind, handle) for handle in ctx.stores.values()]
    waits = [v.task for v in views if v.task is not None]
    if waits:
        await asyncio.wait(waits)


@dataclass(frozen=True)
class GcAsked:
    """What ``tessera gc`` asked for through the API (``POST /v1/maintenance/gc``); an
    option left ``None`` is the configuration's (``maintenance``)."""

    dry_run: bool = False
    repack_threshold: float | None = None
    grace: timedelta | None = None
    rate_limit: int | None = None


def start(ctx: DaemonContext, kind: str, handle: JobStore, *, gc: GcAsked | None = None) -> JobView:
    """Submit ``kind`` on ``handle`` as a job. ConfigError (the API's 400) for GC options out
    of range, before the job starts."""
    section = ctx.config.maintenance
    asked = gc or GcAsked()
    try:
        options = GcOptions(
            dry_run=asked.dry_run,
            grace=section.gc_grace.delta if asked.grace is None else asked.grace,
            repack_threshold=section.repack_threshold
            if asked.repack_threshold is None
            else asked.repack_threshold,
            rate_limit=asked.rate_limit,
            now=ctx.clock.now,  # the daemon's clock (injected in tests)
        )
    except ValueError as e:
        raise ConfigError(message=f"gc: {e}") from e
    if options.grace < timedelta(0):
        raise ConfigError(message="gc: the grace period cannot be negative")

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        if kind == "gc":
            result = await run_gc(handle.store, options)
            view.outcome = result
            for line in result.lines():
                view.say(line)
            return "succeeded", gc_doc(result)
        found = await run_verify(handle.store, VerifyOptions(percent=section.verify_percent))
        view.outcome = found
        for line in verify_lines(found):
            view.say(line)
        if not found.ok:
            view.error = f"{len(found.findings)} findings; damaged snapshots: {found.damaged}"
        return ("succeeded" if found.ok else "failed"), verify_doc(found)

    params: dict[str, Any] = {"store": handle.name}
    if kind == "gc" and asked.dry_run:
        params["dry_run"] = True
    return ctx.jobs.submit(kind, f"store:{handle.name}", body, params=params)


def state_file_for(scheduler_state: Path) -> Path:
    """The maintenance scheduler's state file beside the policies' one."""
    return scheduler_state.with_name(scheduler_state.stem + "-maintenance.json")
