"""``tessera run``: the DataMover service — stores, job manager, scheduler, API, in one loop.

Startup order (each step can fail with a clear error before the next starts):

1. configuration and policies loaded and checked (``engine.config.loader.load_all``);
2. logging configured (JSON to stdout for journald, optional syslog forwarding);
3. every configured store opened for writing (open = recover) and the jobs a killed
   process left unfinished are finished or cleaned up (journal → plugin ``recover``); the
   jobs a stopped daemon was running become finished rows of the job history (interrupted,
   linked to that recovery by job id: ``engine.jobs.history``), then the history is read;
   what a killed daemon's NBD exports and browsing sessions left (sockets, overlays,
   downloads) is removed (``engine.daemon.exports.sweep``);
4. CPU pools, the job manager, the API listeners (root-only unix socket; TCP+TLS with
   bearer tokens when configured), the scheduler;
5. ``READY=1`` to systemd, then the watchdog pings.

Stop: the first SIGTERM (or SIGINT) stops the scheduler and the API from starting jobs and
gives running jobs ``grace`` seconds to finish; a second signal, or the end of the grace
period, cancels them — their state machines clean up (snapshot removed, transfers
cancelled, disks detached) before the process exits. Anything a crash interrupts is the
next start's step 3.
"""

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import structlog

from engine.app.backup import backup_vms
from engine.app.plan import select
from engine.app.requests import VmBackupRequest, VmRestoreRequest
from engine.app.restore import plan_vm_restore, restore_vm
from engine.app.stores import JobStore, open_for_jobs_at
from engine.app.summaries import backup_doc, vm_restore_doc
from engine.config.loader import LoadedConfig
from engine.config.models import Config, StoreSection
from engine.config.policy import Policy
from engine.core.errors import ConfigError, EngineError
from engine.daemon import browse, exports, maintenance, sdnotify, sites
from engine.daemon.checks import CHECK_KIND, CHECK_VM_PREFIX, policy_request, start_check
from engine.daemon.context import DaemonContext
from engine.daemon.jobs import FINISHED_KEPT, JobManager, JobView
from engine.daemon.notifications import PolicyRun, Senders
from engine.jobs.backup import BackupOutcome
from engine.jobs.history import FILENAME as HISTORY_FILE
from engine.jobs.history import JobHistory, newest
from engine.jobs.journal import JobRecord, Journal
from engine.maint.prune import MANUAL_HELD, prune
from engine.maint.retention import Rules
from engine.maint.verify import VerifyResult
from engine.obs.digest import RunSummary
from engine.obs.metrics import Metrics, ObjectStoreCounts
from engine.obs.summary import DiskSummary, JobSummary
from engine.sched.clock import Clock, SystemClock
from engine.sched.scheduler import Event, Scheduler
from engine.sources import registry
from engine.sources.types import disk_labels
from engine.store.chunk_store import Store
from engine.util.limits import Limits

log = structlog.get_logger("tessera.daemon")

DEFAULT_GRACE: Final = 300.0  # seconds running jobs get after the first SIGTERM
# How often the job history learns that the running jobs still run: a job killed with its
# daemon is shown ending at its last heartbeat, at most this long before the daemon died.
HEARTBEAT: Final = 60.0
# Configuration sections the running daemon is built on: a reload cannot change them.
RESTART_ONLY: Final = (
    "stores",
    "limits",
    "api",
    "logging",
    "syslog",
    "scheduler",
    "peer_server",
    "serve",
)


@dataclass
class Service:
    """One daemon process. ``run`` returns after a clean stop."""

    loaded: LoadedConfig
    clock: Clock = field(default_factory=SystemClock)
    grace: float = DEFAULT_GRACE
    stores: dict[str, JobStore] = field(default_factory=dict)
    histories: dict[str, JobHistory] = field(default_factory=dict)
    # Reads the configuration and policies again (``tessera run`` passes its load_all) for
    # SIGHUP; None: a reload is refused with a log line.
    loader: Callable[[], LoadedConfig] | None = None
    listeners: list[Callable[[JobView], Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        lim = self.config.limits
        self.limits = Limits(
            {
                "vms": lim.concurrent_vms,
                "transfers/host": lim.transfers_per_host,
                "transfers/sd": lim.transfers_per_storage_domain,
                "api": lim.api_calls,
            }
        )
        self.jobs = JobManager(self.limits, on_finished=self._finished, on_started=self._started)
        # The history's writes, one at a time in the order asked for: a job's ``started``
        # row can never land after its finished one.
        self._history_writer = ThreadPoolExecutor(1, thread_name_prefix="history-writer")
        self.metrics = Metrics()
        self.notifications = Senders(self.config)
        self.metrics.watch_counter(
            "tessera_notifications_failed",
            "e-mails and webhook calls that could not be sent",
            lambda: self.notifications.failed,
        )
        self.scheduler: Scheduler[Policy] | None = None
        self.maintenance: Scheduler[maintenance.Task] | None = None
        self.started = datetime.now(UTC)
        self._stop = asyncio.Event()
        # Set once every listener runs and ``READY=1`` went to systemd: what an embedding
        # (a test) waits on instead of polling.
        self.ready = asyncio.Event()
        self._signals = 0
        self.sessions = browse.Sessions(self)  # file browsing (``/v1/files``)

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def policies(self) -> tuple[Policy, ...]:
        return self.loaded.policies

    @property
    def tz(self) -> tzinfo:
        zone = self.config.scheduler.timezone
        return zone if zone is not None else datetime.now().astimezone().tzinfo or UTC

    # -- lifecycle ------------------------------------------------------------------------

    async def run(
        self, api: Callable[["Service"], Awaitable[Callable[[], Awaitable[None]]]]
    ) -> None:
        """Run until stopped. ``api`` starts the listeners and returns their cleanup."""
        async with AsyncExitStack() as stack:
            stack.push_async_callback(asyncio.to_thread, self._history_writer.shutdown)
            sdnotify.status("opening stores")
            for section in self.config.stores:
                handle = await self._open_store(section)
                stack.push_async_callback(self._close_store, handle)
            await self._finish_interrupted()
            await self._load_history()
            for leftover in await asyncio.to_thread(exports.sweep, self.config):
                log.warning("serve.leftover_removed", path=str(leftover))
            self.scheduler = Scheduler(
                [p for p in self.policies if p.enabled],
                self.run_policy,
                clock=self.clock,
                tz=self.tz,
                state_file=self.config.scheduler.state_file,
                misfire_grace=self.config.scheduler.misfire_grace.delta,
                on_event=self._scheduler_event,
            )
            self.maintenance = Scheduler(
                maintenance.tasks(self.config.maintenance),
                lambda task, planned: maintenance.run_task(self, task),
                clock=self.clock,
                tz=self.tz,
                state_file=maintenance.state_file_for(self.config.scheduler.state_file),
                misfire_grace=self.config.scheduler.misfire_grace.delta,
                on_event=self._scheduler_event,
            )
            stop_api = await api(self)
            stack.push_async_callback(stop_api)
            if self.config.peer_server is not None:
                peer_server = await sites.start_peer_server(self, self.config.peer_server)
                stack.push_async_callback(peer_server.stop)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                stack.callback(loop.remove_signal_handler, sig)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            async with asyncio.TaskGroup() as tg:
                manager = tg.create_task(self.jobs.run(), name="jobs")
                scheduler = tg.create_task(self.scheduler.run(), name="scheduler")
                upkeep = tg.create_task(self.maintenance.run(), name="maintenance")
                watchdog = tg.create_task(self._watchdog(), name="watchdog")
                heartbeat = tg.create_task(self._heartbeat(), name="history heartbeat")
                sdnotify.ready()
                sdnotify.status(f"ready: {len(self.policies)} policies")
                log.info("daemon.ready", stores=list(self.stores), policies=len(self.policies))
                self.ready.set()
                await self._stop.wait()
                sdnotify.stopping()
                log.info("daemon.stopping", running=len(self.jobs.running()), grace=self.grace)
                scheduler.cancel()
                upkeep.cancel()
                if not await self.jobs.drain(self.grace) or self._signals > 1:
                    self.jobs.cancel_all("cancelled: the daemon is stopping")
                self.jobs.close()
                await manager
                watchdog.cancel()
                heartbeat.cancel()
        log.info("daemon.stopped")

    def reload(self) -> bool:
        """SIGHUP: read the configuration and policies again and apply them without touching
        running jobs. New jobs use the new engines, DataMover, peers, e-mail, webhooks and
        policies;
        each schedule (policies and maintenance) restarts under its new calendars from its
        state-file record; a run in progress goes on to its end. Sections the running
        daemon is built on (``RESTART_ONLY``: stores, limits, API, logging, syslog,
        scheduler, peer server) cannot change: such a reload, or one whose files do not
        load, is refused as a whole with an error in the log, and the old configuration
        stays. Returns whether it applied."""
        if self.loader is None:
            log.warning("daemon.reload_refused", reason="this daemon has no configuration file")
            return False
        try:
            loaded = self.loader()
        except ConfigError as e:
            log.error(  # noqa: TRY400 - the error names file and key; no traceback helps
                "daemon.reload_failed", error=str(e), hint="the old configuration stays"
            )
            return False
        fixed = [
            name
            for name in RESTART_ONLY
            if getattr(loaded.config, name) != getattr(self.config, name)
        ]
        if fixed:
            log.error(
                "daemon.reload_failed",
                error=f"changed sections need a restart: {', '.join(fixed)}",
                hint="the old configuration stays; restart the daemon to apply them",
            )
            return False
        self.loaded = loaded
        self.notifications.reconfigure(self.config)
        changes: dict[str, object] = {}
        if self.scheduler is not None:
            added, changed, removed = self.scheduler.replace(
                [p for p in self.policies if p.enabled]
            )
            changes |= {"added": added, "changed": changed, "removed": removed}
        if self.maintenance is not None:
            self.maintenance.replace(maintenance.tasks(self.config.maintenance))
        running = len(self.jobs.running())
        log.info("daemon.reloaded", policies=len(self.policies), running=running, **changes)
        sdnotify.status(f"ready: {len(self.policies)} policies (reloaded)")
        return True

    def request_stop(self) -> None:
        """First call: drain; second call: cancel running jobs now."""
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
        else:
            log.warning("daemon.cancelling_jobs", running=len(self.jobs.running()))
            self.jobs.cancel_all("cancelled: the daemon was told to stop again")

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(interval)

    async def _open_store(self, section: StoreSection) -> JobStore:
        handle, recovered = await open_for_jobs_at(
            section.name,
            section.path,
            passphrase_file=section.passphrase_file,
            key_file=section.key_file,
            cpu_tasks=self.config.limits.cpu_tasks,
        )
        for line in handle.store.report.lines():
            log.warning("store.recovery", store=section.name, detail=line)
        for line in recovered:
            log.warning("job.recovered", store=section.name, detail=line)
        self.stores[section.name] = handle
        if handle.store.remote is not None:
            self.metrics.watch_object_store(section.name, partial(_bucket_counts, handle.store))
        self.histories[section.name] = JobHistory(section.path / HISTORY_FILE)
        return handle

    async def _heartbeat(self) -> None:
        """Tell the job histories, every ``HEARTBEAT`` seconds while jobs run, that their
        running jobs still run (``JobHistory.alive``)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            if self.jobs.running():
                now = datetime.now(UTC)
                for history in list(self.histories.values()):
                    await self._history_write(history.alive, now)

    async def _history_write(self, write: Callable[..., bool], *args: Any) -> None:
        """A history write on the history's writer thread, after those asked for before."""
        await asyncio.get_running_loop().run_in_executor(self._history_writer, write, *args)

    async def _finish_interrupted(self) -> None:
        """The jobs a stopped daemon was running, as finished rows of each store's history
        (``JobHistory.finish_interrupted``), each with its journal record as the store's
        recovery left it; logged one by one."""
        now = datetime.now(UTC)
        for name, history in self.histories.items():
            lookup = partial(_journal_record, self.stores[name].journal)
            rows = await asyncio.to_thread(history.finish_interrupted, lookup, now)
            for row in rows:
                log.warning(
                    "job.interrupted",
                    store=name,
                    job=row["job_id"],
                    kind=row["kind"],
                    vm=row["vm"],
                    state=row["state"],
                    started=row["started"],
                    last_seen=row["finished"],
                    note=row["summary"]["interrupted"]["note"],
                )

    async def _load_history(self) -> None:
        """The jobs and last successes a previous daemon recorded (``engine.jobs.history``):
        the API and ``/metrics`` show them as before the restart."""
        histories = list(self.histories.values())
        docs = await asyncio.to_thread(newest, histories, limit=FINISHED_KEPT)
        self.jobs.restore_history(list(reversed(docs)))
        last: dict[str, datetime] = {}
        for history in histories:
            for vm, when in (await asyncio.to_thread(history.last_success)).items():
                if not vm.startswith(CHECK_VM_PREFIX):  # a check's, as in _finished
                    last[vm] = max(when, last.get(vm, when))
        for vm, when in last.items():
            self.metrics.restore_last_success(vm, when.timestamp())
        log.info("history.loaded", jobs=len(docs), vms=len(last))

    def _history_for(self, view: JobView) -> JobHistory | None:
        """The history of the job's store (the first store for a job that names none)."""
        name = view.params.get("store")
        if name in self.histories:
            return self.histories[name]
        return next(iter(self.histories.values()), None)

    async def _close_store(self, handle: JobStore) -> None:
        await handle.aclose()
        history = self.histories.pop(handle.name, None)
        if history is not None:
            await asyncio.to_thread(history.close)  # SQLite may checkpoint its WAL

    def api_gate(self, engine: str) -> Callable[[], AbstractAsyncContextManager[object]]:
        """What every engine call of every job holds: the ``api/<engine>`` limit
        (``limits.api_calls`` concurrent REST calls per engine, across jobs)."""
        limit = self.limits.get(f"api/{engine}")
        return limit.hold

    def store(self, name: str | None = None) -> JobStore:
        section = self.config.store(name)
        return self.stores[section.name]

    # -- jobs -----------------------------------------------------------------------------

    async def list_vms(self, engine: str | None = None) -> list[dict[str, Any]]:
        section = self.config.engine(engine)
        _, hypervisor = registry.hypervisor(section)
        return await hypervisor.list_vms(section, api_gate=self.api_gate(section.name))

    def start_backup(
        self,
        vms: list[str],
        *,
        level: str = "incremental",
        flow: str = "auto",
        require_quiesce: bool = False,
        engine: str | None = None,
        store: str | None = None,
        policy: str | None = None,
        facts: Mapping[str, Mapping[str, Any]] | None = None,
        disks: Sequence[str] = (),
    ) -> list[JobView]:
        """One backup job per VM name (exact names; the API resolves globs first), each
        ``engine.app.backup.backup_vms`` of that VM. ``facts`` (``list_vms`` entries by
        name) give each job its transfer needs per host and storage domain. ``disks``
        (a policy's ``selection.disks``, the API's ``disks``; empty: all) limits the disks
        each job reads."""
        VmBackupRequest((), level, flow, require_quiesce, engine).check()
        engine_section = self.config.engine(engine)
        handle = self.store(store)
        params: dict[str, Any] = {"level": level, "flow": flow, "engine": engine_section.name}
        params |= {"store": handle.name, "require_quiesce": require_quiesce}
        params |= {"disks": list(disks)} if disks else {}
        views = []
        for vm in vms:
            request = VmBackupRequest(
                (vm,),
                level,
                flow,
                require_quiesce,
                engine_section.name,
                policy=policy,
                disks=tuple(disks),
            )

            async def body(
                view: JobView, request: VmBackupRequest = request
            ) -> tuple[str, dict[str, Any]]:
                backups = backup_vms(
                    self.config,
                    handle,
                    request,
                    progress=lambda _vm: nullcontext(view.progress),
                    api_gate=self.api_gate(engine_section.name),
                    job_id=view.job_id,
                )
                (outcome,) = [o async for o in backups]
                view.outcome = outcome
                for note in outcome.notes:
                    view.note("note", note)
                for warning in outcome.record.warnings:
                    view.note("warning", warning)
                view.say(outcome.summary())
                view.error = outcome.record.error
                return outcome.record.state.value.lower(), backup_doc(outcome)

            needs = transfer_needs((facts or {}).get(vm))
            views.append(
                self.jobs.submit("backup", vm, body, policy=policy, params=params, needs=needs)
            )
        return views

    def start_restore(
        self,
        snapshot: str,
        *,
        name: str | None = None,
        cluster: str | None = None,
        storage_domain: str | None = None,
        flow: str = "imageio",
        engine: str | None = None,
        store: str | None = None,
        disk: str | None = None,
        into_vm: str | None = None,
    ) -> JobView:
        """A snapshot restored into the engine as a new VM, or its disk(s) attached to the
        existing VM ``into_vm`` (``engine.app.restore``); planned before the job starts, so
        an unknown snapshot or disk is refused at once."""
        handle = self.store(store)
        engine_section = self.config.engine(engine)
        request = VmRestoreRequest(
            snapshot, name, cluster, storage_domain, flow, engine_section.name, disk, into_vm
        )
        plan = plan_vm_restore(handle, request)
        params: dict[str, Any] = {"snapshot": plan.snapshot_id, "name": plan.new_name}
        params |= {"flow": flow, "cluster": cluster}
        params |= {"storage_domain": storage_domain, "store": handle.name}

        async def body(view: JobView) -> tuple[str, dict[str, Any]]:
            outcome = await restore_vm(
                self.config,
                handle,
                plan,
                progress=view.progress,
                api_gate=self.api_gate(engine_section.name),
                job_id=view.job_id,
            )
            view.outcome = outcome
            view.say(outcome.restore.summary())
            view.error = outcome.restore.record.error
            return outcome.restore.record.state.value.lower(), vm_restore_doc(outcome)

        return self.jobs.submit(
            "restore",
            plan.new_name,
            body,
            params=params,
            needs=plan.transfer_needs(self.config.limits.restore_disks),
        )

    async def run_policy(self, policy: Policy, planned: datetime) -> None:
        """What the scheduler starts: a backup of every VM the policy selects, each at the
        level its rules give, each followed by the policy's push replications; then its
        retention; then one digest of the run (``send_digest``). Returns when all have
        ended (so the scheduler coalesces a fire that comes while they run). A VM whose
        backup cannot start (busy, the daemon stopping) is a problem of the run, not the end
        of it; an error listing the VMs or applying retention ends the run, is in its digest
        and is raised. A cancelled run (the daemon stops) sends no digest. A policy whose
        replication targets are all ``pull`` backs nothing up here: it asks those peers to
        push the VMs its selection names (no digest: the peers' jobs are theirs)."""
        if policy.replication and all(t.mode == "pull" for t in policy.replication):
            await sites.pull(self, policy, list(policy.selection.vms))
            return
        run = PolicyRun(policy, datetime.now(UTC))
        try:
            await self._run_policy(policy, planned, run)
        except Exception as e:
            run.problems.append(f"{type(e).__name__}: {e}")
            await self.send_digest(run.summary(job_summary))
            raise
        await self.send_digest(run.summary(job_summary))

    async def _run_policy(self, policy: Policy, planned: datetime, run: PolicyRun) -> None:
        vms = await self.list_vms(policy.selection.engine)
        by_name = {v["name"]: v for v in vms}
        chosen = select(policy.selection, vms)  # as ``policies --show-selection`` shows
        handle = self.store(policy.store)
        log.info("policy.fired", policy=policy.name, planned=planned.isoformat(), vms=chosen)
        if not chosen:
            run.warnings.append(f"the selection matched none of the {len(vms)} VMs listed")

        async def one(vm: str) -> None:
            # Another policy's job on this VM: wait for it (serialised, never overlapping).
            while (busy := self.jobs.busy_job(vm)) is not None:
                log.info("policy.vm_busy", policy=policy.name, vm=vm, job=busy)
                task = self.jobs.get(busy).task
                if task is not None:
                    await asyncio.wait([task])
            history = handle.store.snapshots(vm)
            fulls = [datetime.fromisoformat(e.time) for e in history if e.level == "full"]
            decision = policy.level.decide(max(fulls) if fulls else None, self.clock.now(), self.tz)
            try:
                (view,) = self.start_backup(
                    [vm],
                    level=decision.level,
                    flow=policy.flow,
                    require_quiesce=policy.require_quiesce,
                    engine=policy.selection.engine,
                    store=policy.store,
                    policy=policy.name,
                    facts=by_name,
                    disks=policy.selection.disks,
                )
            except EngineError as e:  # Busy (a job started meanwhile), ShuttingDown
                log.warning("policy.vm_not_started", policy=policy.name, vm=vm, error=str(e))
                run.problems.append(f"{vm}: not started: {e}")
                return
            run.views.append(view)
            view.say(f"level {decision.level}: {decision.reason}")
            if view.task is not None:
                await asyncio.wait([view.task])
            outcome = view.outcome
            if view.state != "succeeded" or not isinstance(outcome, BackupOutcome):
                return
            if outcome.manifest is None:
                return
            snapshot = outcome.manifest.snapshot_id
            after = [
                sites.start_replication(self, policy, vm, snapshot, target.peer)
                for target in policy.replication
                if target.mode == "push"
            ]
            checks = policy.restore_check
            if checks is not None and checks.after_backup:  # beside the replications
                try:
                    request = policy_request(snapshot, checks)
                    after.append(start_check(self, handle, request, policy=policy.name))
                except EngineError as e:  # the daemon stopping, the snapshot pruned meanwhile
                    run.problems.append(f"{vm}: restore check of {snapshot} not started: {e}")
            run.views += after
            waits = [p.task for p in after if p.task is not None]
            if waits:
                await asyncio.wait(waits)

        async with asyncio.TaskGroup() as tg:
            for vm in chosen:
                tg.create_task(one(vm))
        await self.apply_retention(policy, handle, chosen)

    async def send_digest(self, run: RunSummary) -> None:
        """The run's digest to its policy's ``notifications`` as they are now (a reload
        may have changed them while it ran): ``Senders.run_digest``."""
        policy = next((p for p in self.policies if p.name == run.policy), None)
        await self.notifications.run_digest(run, policy.notifications if policy else None)

    async def apply_retention(self, policy: Policy, handle: JobStore, vms: list[str]) -> None:
        """After a policy's backups: its retention rules, per VM (prune; GC frees the space
        later, after its grace period). No rules: keep everything. Snapshots made by hand
        are held (kept, not counted) unless ``retention.include_manual``."""
        r = policy.retention
        rules = Rules(
            keep_last=r.keep_last,
            keep_hourly=r.keep_hourly,
            keep_daily=r.keep_daily,
            keep_weekly=r.keep_weekly,
            keep_monthly=r.keep_monthly,
            keep_yearly=r.keep_yearly,
            keep_within=str(r.keep_within) if r.keep_within is not None else None,
        )
        if rules.empty():
            return
        for vm in vms:
            result = await asyncio.to_thread(
                prune,
                handle.store,
                rules,
                vm=vm,
                now=self.clock.now(),
                tz=self.tz,
                hold_manual=not r.include_manual,
            )
            log.info(
                "retention.applied",
                policy=policy.name,
                vm=vm,
                rules=rules.describe(),
                removed=result.removed,
                skipped=result.skipped,
                locked=result.locked,
                kept_manual=[d.snapshot_id for d in result.decisions if MANUAL_HELD in d.reasons],
            )

    def _scheduler_event(self, event: Event) -> None:
        log.info(
            "schedule.event",
            policy=event.policy,
            planned=event.planned.isoformat(),
            outcome=event.outcome,
            reason=event.reason,
        )

    async def _started(self, view: JobView) -> None:
        """Metrics, and the job's ``started`` row in its store's history, durable before the
        job runs: a daemon killed from now on leaves a row the next start turns into an
        interrupted job (``_finish_interrupted``)."""
        self.metrics.job_started(view.kind)
        history = self._history_for(view)
        if history is not None:
            await self._history_write(history.started, view.started_row())

    async def _finished(self, view: JobView) -> None:
        """The job history, metrics, the store gauges and, for maintenance that failed or
        found damage (a restore check not a policy's included), the mail and webhooks of
        ``maintenance`` for a job that ended (a policy's jobs are told of in its run's
        digest: ``send_digest``)."""
        history = self._history_for(view)
        if history is not None:
            await self._history_write(history.record, view.history_row())
        summary = job_summary(view)
        self.metrics.job_finished(
            view.kind,
            view.state,
            None if view.kind == CHECK_KIND else view.vm,  # a gauge per snapshot: never
            bytes_read=summary.bytes_read,
            bytes_stored=summary.bytes_stored,
            seconds=view.outcome.seconds if isinstance(view.outcome, BackupOutcome) else 0.0,
            new_chunks=sum(d.new_chunks for d in summary.disks),
            finished_at=summary.finished.timestamp() if summary.finished else None,
        )
        store = view.params.get("store")
        if store in self.stores:
            info = await asyncio.to_thread(self.stores[store].store.info)
            self.metrics.set_store_usage(
                store, info.pack_bytes, info.dedup_ratio, info.compression_ratio
            )
        mailed = view.kind in ("gc", "verify") or (view.kind == CHECK_KIND and view.policy is None)
        if mailed and view.state != "succeeded":  # a policy's check: in its run's digest
            await self.notifications.maintenance(summary, self.config.maintenance)
        for listener in self.listeners:
            await listener(view)


def _bucket_counts(store: Store) -> ObjectStoreCounts:
    """A store in a bucket: its request counters and cache, for ``/metrics``."""
    assert store.remote is not None
    counts = store.remote.objects.counters.snapshot()
    budget = store.remote.objects.budget
    return ObjectStoreCounts(
        requests={k: c.requests for k, c in counts.items()},
        bytes={k: c.bytes for k, c in counts.items()},
        cache_bytes=store.remote.cached_bytes,
        fetches=store.remote.fetches,
        month_requests=budget.used()[1] if budget is not None else 0,
        month_budget=budget.per_month if budget is not None else 0,
    )


def _journal_record(journal: Journal, job_id: str) -> JobRecord | None:
    """The job's journal record, or None when it has none or it cannot be read (blocking)."""
    try:
        return journal.load(job_id)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def transfer_needs(vm: Mapping[str, Any] | None) -> dict[str, int]:
    """Image transfers one VM's backup opens: one per disk, on the VM's host (when it runs)
    and on each disk's storage domain."""
    if vm is None:
        return {}
    disks = vm.get("disks", [])
    needs: dict[str, int] = {}
    if vm.get("host_id") and disks:
        needs[f"transfers/host/{vm['host_id']}"] = len(disks)
    for sd, n in Counter(d.get("storage_domain_id") for d in disks).items():
        if sd:
            needs[f"transfers/sd/{sd}"] = n
    return needs


def job_summary(view: JobView) -> JobSummary:
    """The e-mail/metrics view of a finished job, from its typed outcome (a backup's bytes,
    disks, level and snapshot; other kinds have none) and its notes."""
    outcome = view.outcome if isinstance(view.outcome, BackupOutcome) else None
    stats = outcome.disks if outcome is not None else []
    labels = disk_labels((d.disk_id, d.name) for d in stats)  # names, not ids, in mails
    full = outcome is not None and outcome.level == "full"
    disks = tuple(
        DiskSummary(
            name=labels[d.disk_id],
            bytes_read=d.bytes_read,
            bytes_stored=d.bytes_stored,
            new_chunks=d.new_chunks,
            read="full" if full or d.fallback_reason else "dirty",
            note=d.fallback_reason,
        )
        for d in stats
    )
    return JobSummary(
        job_id=view.job_id,
        kind=view.kind,
        vm=view.vm,
        state=view.state,
        started=datetime.fromisoformat(view.started or view.created),
        finished=datetime.fromisoformat(view.finished) if view.finished else None,
        level=outcome.level if outcome is not None else None,
        policy=view.policy,
        snapshot=outcome.manifest.snapshot_id if outcome and outcome.manifest else None,
        bytes_read=sum(d.bytes_read for d in disks),
        bytes_stored=sum(d.bytes_stored for d in disks),
        disks=disks,
        notes=tuple(view.notes),
        warnings=tuple(view.warnings),
        error=view.error,
        integrity=(outcome is not None and outcome.record.integrity)
        or (isinstance(view.outcome, VerifyResult) and not view.outcome.ok),
    )


if TYPE_CHECKING:  # mypy proves the service gives its runs what they need

    def _fits(service: Service) -> DaemonContext:
        return service
