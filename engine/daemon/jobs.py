"""The daemon's job manager: runs backup and restore jobs, holds their live state for the API.

A *job* here is one VM's backup or one snapshot's restore, the same unit as in the journal
(same id). ``JobManager`` starts each one as a task in its own TaskGroup. A job first holds
its named limits (``engine.util.limits``): ``vms`` (``limits.concurrent_vms``) and the image
transfers it opens per host and per storage domain. At most one job per VM runs at a time: a
second request for a busy VM is refused with ``Busy`` (the API answers 409; a policy run
waits for it). Each job's ``JobView`` holds what the API shows: state, per-disk progress
(bytes, total, rate, ETA), log lines and the summary.

*Open-ended* jobs (``submit(open_ended=True)``: an NBD export, a file browsing session) serve
until they are cancelled or their own timeout ends them; they hold no ``vms`` unit and mark
no VM busy (two exports of one snapshot run at once), and a drain cancels them first: they
have nothing to finish.

Shutdown (``drain``): no new jobs; open-ended jobs are cancelled; running ones finish within
the grace period; then ``cancel_all`` cancels the rest, whose state machines clean up
(CANCELLING) before the tasks end. Nothing here touches the engine or the store directly:
jobs go through ``engine.jobs`` and plugins through the registry.
"""

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from engine.core.errors import ConfigError, EngineError
from engine.jobs.journal import new_job_id
from engine.util.limits import Limits

log = structlog.get_logger("tessera.daemon")

LOG_LINES: Final = 200  # kept per job for the API; everything is in the daemon log too
FINISHED_KEPT: Final = 500  # finished jobs kept in memory; older ones are in the journal


class Busy(EngineError):
    """A job for this VM is already running."""

    template = "VM {vm} already has a running job {job_id}"


class ShuttingDown(EngineError):
    template = "the daemon is shutting down: no new jobs{why}"


class AlreadyEnded(EngineError):
    """``cancel`` of a job that is no longer running (the API answers 409)."""

    template = "job {job_id} already ended ({state}): nothing to cancel"


@dataclass
class DiskProgress:
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    def doc(self) -> dict[str, Any]:
        seconds = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / seconds
        left = max(self.total - self.done, 0)
        return {
            "done": self.done,
            "total": self.total,
            "rate": round(rate),
            "eta": round(left / rate, 1) if rate > 0 and left else (0.0 if not left else None),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class JobView:
    job_id: str
    kind: str  # backup | restore
    vm: str
    policy: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    state: str = "queued"  # queued, running, then the journal's final state in lower case
    created: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    disks: dict[str, DiskProgress] = field(default_factory=dict)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    summary: dict[str, Any] = field(default_factory=dict)  # the API's shape of ``outcome``
    error: str | None = None
    task: asyncio.Task[None] | None = None
    outcome: object | None = None  # the typed outcome (``engine.app``), set by the body
    notes: list[str] = field(default_factory=list)  # notes and warnings, for the e-mail

    def note(self, kind: str, text: str) -> None:
        """A note or warning (``kind``) of the job: in its notes and in its log lines."""
        self.notes.append(f"{kind}: {text}")
        self.say(f"{kind}: {text}")

    @property
    def warnings(self) -> list[str]:
        """The job's warnings (its notes of kind ``warning``), without the prefix."""
        return [n.removeprefix("warning: ") for n in self.notes if n.startswith("warning: ")]

    @property
    def log_level(self) -> str:
        """The level of the job's ``job.finished`` line, so syslog's severity says how it
        ended: failed ``error`` (syslog ``err``), cancelled or succeeded with warnings
        ``warning``, succeeded ``info``."""
        if self.state == "failed":
            return "error"
        if self.state == "cancelled" or self.warnings:
            return "warning"
        return "info"

    @property
    def done(self) -> bool:
        return self.finished is not None

    def say(self, line: str) -> None:
        self.lines.append(f"{_now()} {line}")

    def progress(self, disk: str, done: int, total: int) -> None:
        p = self.disks.setdefault(disk, DiskProgress(total=total))
        p.done, p.total = done, total

    def started_row(self) -> dict[str, Any]:
        """This running job as an ``engine.jobs.history`` ``started`` row."""
        assert self.started is not None
        keys = ("job_id", "kind", "vm", "policy", "created", "started", "params")
        return {k: getattr(self, k) for k in keys}

    def history_row(self) -> dict[str, Any]:
        """This finished job as an ``engine.jobs.history`` row."""
        assert self.finished is not None
        return {
            "job_id": self.job_id,
            "kind": self.kind,
            "vm": self.vm,
            "policy": self.policy,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "params": self.params,
            "summary": self.summary,
        }

    def doc(self, lines: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.job_id,
            "kind": self.kind,
            "vm": self.vm,
            "policy": self.policy,
            "params": self.params,
            "state": self.state,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "disks": {name: p.doc() for name, p in self.disks.items()},
            "summary": self.summary,
            "error": self.error,
        }
        if lines:
            doc["log"] = list(self.lines)
        return doc


# What a job runs: given its view (to report progress and lines), returns the final state
# ("succeeded", "failed", ...) and a summary; raises for a job that could not even start.
JobBody = Callable[[JobView], Awaitable[tuple[str, dict[str, Any]]]]
Listener = Callable[[JobView], Awaitable[None]]


class JobManager:
    def __init__(
        self,
        limits: Limits,
        on_finished: Listener | None = None,
        on_started: Listener | None = None,
    ):
        """``limits`` must have a ``vms`` family (jobs at once); a job's other ``needs``
        (e.g. ``transfers/host/<id>``) are held with it, in name order. ``on_started`` is
        awaited when a job starts running, before its body (the daemon makes its history's
        ``started`` row durable there); ``on_finished`` after it ended. Neither's failure
        fails the job."""
        self.limits = limits
        self._on_started = on_started
        self._jobs: dict[str, JobView] = {}
        self._busy: dict[str, str] = {}  # vm -> running job id
        self._open_ended: set[str] = set()  # running open-ended jobs (not in ``_busy``)
        self._on_finished = on_finished
        self._group: asyncio.TaskGroup | None = None
        self._accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = asyncio.Event()

    # -- what the API reads -------------------------------------------------------------

    def get(self, job_id: str) -> JobView:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ConfigError(message=f"no job {job_id!r}") from None

    def jobs(
        self,
        *,
        running_only: bool = False,
        since: datetime | None = None,
        failed: bool = False,
    ) -> list[JobView]:
        """In submission order (ids sort by second only); ``since``: running ones and those
        that finished at or after it; ``failed``: only finished jobs that did not succeed."""
        jobs = list(self._jobs.values())
        if running_only:
            jobs = [j for j in jobs if not j.done]
        if since is not None:
            jobs = [
                j for j in jobs if j.finished is None or datetime.fromisoformat(j.finished) >= since
            ]
        if failed:
            jobs = [j for j in jobs if j.done and j.state != "succeeded"]
        return jobs

    def restore_history(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Jobs a previous daemon finished (``engine.jobs.history`` rows, oldest first), so
        the API lists them as before the restart. Their log lines stay in that daemon's log."""
        for doc in docs:
            if doc["job_id"] in self._jobs:
                continue
            view = JobView(
                doc["job_id"],
                doc["kind"],
                doc["vm"],
                doc.get("policy"),
                dict(doc.get("params") or {}),
                state=doc["state"],
                created=doc["created"],
                started=doc.get("started"),
                finished=doc["finished"],
                summary=dict(doc.get("summary") or {}),
                error=doc.get("error"),
            )
            view.lines.append(f"{doc['finished']} (from the job history: the log lines are in "
                              "the daemon log of that time)")  # fmt: skip
            self._jobs[view.job_id] = view
        self._forget_old()

    def running(self) -> list[JobView]:
        return [j for j in self._jobs.values() if not j.done]

    def busy_job(self, vm: str) -> str | None:
        return self._busy.get(vm)

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the job tasks until ``close``; returns when every job has ended."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            await self._closed.wait()
        self._group = None

    def submit(
        self,
        kind: str,
        vm: str,
        body: JobBody,
        *,
        policy: str | None = None,
        params: dict[str, Any] | None = None,
        needs: Mapping[str, int] | None = None,
        open_ended: bool = False,
    ) -> JobView:
        """Start a job now; it waits until the ``vms`` limit and its ``needs`` (limit name →
        units) have room. Raises Busy or ShuttingDown. An ``open_ended`` job (module
        docstring) takes no ``vms`` unit and never makes its ``vm`` busy."""
        if not self._accepting or self._group is None:
            raise ShuttingDown(why="")
        if not open_ended and vm in self._busy:
            raise Busy(vm=vm, job_id=self._busy[vm])
        view = JobView(new_job_id(), kind, vm, policy, dict(params or {}))
        self._jobs[view.job_id] = view
        if open_ended:
            self._open_ended.add(view.job_id)
            held = dict(needs or {})
        else:
            self._busy[vm] = view.job_id
            self._idle.clear()
            held = {"vms": 1, **(needs or {})}
        view.task = self._group.create_task(self._run(view, body, held), name=f"job {view.job_id}")
        self._forget_old()
        return view

    async def _run(self, view: JobView, body: JobBody, needs: Mapping[str, int]) -> None:
        bound = log.bind(job=view.job_id, kind=view.kind, vm=view.vm, policy=view.policy)
        try:
            async with self.limits.hold(needs):
                view.state, view.started = "running", _now()
                if self._on_started is not None:
                    try:
                        await self._on_started(view)
                    except Exception as e:  # noqa: BLE001 - bookkeeping never fails a job
                        bound.warning("job.listener_failed", error=str(e))
                view.say(f"{view.kind} of {view.vm} started")
                bound.info("job.started", params=view.params)
                view.state, view.summary = await body(view)
        except asyncio.CancelledError:
            view.state, view.error = "cancelled", view.error or "cancelled"
            # The job's own state machine has cleaned up; the task ends normally so that
            # one cancelled job never cancels its siblings in the TaskGroup.
        except Exception as e:  # noqa: BLE001 - the daemon's boundary: one job fails, not all
            view.state, view.error = "failed", str(e)
            bound.warning("job.error", error=str(e), error_type=type(e).__name__, exc_info=True)
        finally:
            view.finished = _now()
            if view.job_id in self._open_ended:
                self._open_ended.discard(view.job_id)
            elif self._busy.get(view.vm) == view.job_id:
                del self._busy[view.vm]
            if not self._busy:
                self._idle.set()
            view.say(f"{view.kind} {view.state}" + (f": {view.error}" if view.error else ""))
            finished = getattr(bound, view.log_level)
            finished(
                "job.finished",
                state=view.state,
                error=view.error,
                warnings=view.warnings,
                summary=view.summary,
            )
        if self._on_finished is not None:
            try:
                await self._on_finished(view)
            except Exception as e:  # noqa: BLE001 - notifications never take the daemon down
                bound.warning("job.listener_failed", error=str(e))

    def cancel(self, job_id: str) -> JobView:
        """Cancel a running job (its state machine cleans up first); ``AlreadyEnded`` if it
        is not running any more."""
        view = self.get(job_id)
        if view.task is None or view.done:
            raise AlreadyEnded(job_id=job_id, state=view.state)
        view.error = "cancelled by request"
        view.task.cancel()
        return view

    async def drain(self, grace: float) -> bool:
        """Stop accepting jobs and wait up to ``grace`` seconds for the running ones;
        True if none is left. Open-ended jobs are cancelled at once (module docstring)."""
        self._accepting = False
        for job_id in list(self._open_ended):
            view = self._jobs[job_id]
            if view.task is not None:
                view.error = "cancelled: the daemon is stopping"
                view.task.cancel()
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def cancel_all(self, reason: str) -> None:
        for view in self.running():
            if view.task is not None:
                view.error = reason
                view.task.cancel()

    def close(self) -> None:
        """Let ``run`` return once the running jobs have ended (call after drain)."""
        self._accepting = False
        self._closed.set()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs() if j.done]
        for view in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._jobs[view.job_id]
