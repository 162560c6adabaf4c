"""Scheduled store maintenance in the daemon: garbage collection and verify.

``config.maintenance`` gives calendar expressions (``gc: "sun 03:00"``, ``verify: "sat
04:00"``); each becomes a scheduled *task* with the same scheduler rules as policies (no
overlap, misfire grace, state file ``<scheduler state>-maintenance.json``). A run is a job
of the ``JobManager`` (kind ``gc`` or ``verify``, its "VM" ``store:<name>``), so it shows in
``tessera jobs`` with its log and summary, and it runs beside backups: GC honours the leases
of running backups (``engine.maint.gc``), verify reads a read-only view. A verify with
findings or a failed run is e-mailed to ``maintenance.notify``.

The work runs in a thread (``engine.app.maintenance``: both are blocking, resumable store
walks); a daemon stop waits for
a running one to reach its next commit — both are safe to kill and resume.
"""

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from engine.app.maintenance import run_gc, run_verify, verify_lines
from engine.app.stores import JobStore
from engine.app.summaries import gc_doc, verify_doc
from engine.config.models import MaintenanceSection
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
    kind: str  # gc | verify
    calendars: tuple[Calendar, ...] = field(default_factory=tuple)


def tasks(section: MaintenanceSection) -> list[Task]:
    out = []
    if section.gc is not None:
        out.append(Task("maintenance/gc", "gc", (section.gc.calendar,)))
    if section.verify is not None:
        out.append(Task("maintenance/verify", "verify", (section.verify.calendar,)))
    return out


async def run_task(ctx: DaemonContext, task: Task) -> None:
    """One run of ``task`` on every store, as daemon jobs; returns when they have ended."""
    views = [start(ctx, task.kind, handle) for handle in ctx.stores.values()]
    waits = [v.task for v in views if v.task is not None]
    if waits:
        await asyncio.wait(waits)


def start(ctx: DaemonContext, kind: str, handle: JobStore) -> JobView:
    section = ctx.config.maintenance

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        if kind == "gc":
            options = GcOptions(
                grace=section.gc_grace.delta,
                repack_threshold=section.repack_threshold,
                now=ctx.clock.now,  # the daemon's clock (injected in tests)
            )
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

    return ctx.jobs.submit(kind, f"store:{handle.name}", body, params={"store": handle.name})


def state_file_for(scheduler_state: Path) -> Path:
    """The maintenance scheduler's state file beside the policies' one."""
    return scheduler_state.with_name(scheduler_state.stem + "-maintenance.json")
