"""The daemon's notifications: who hears of a policy run and of a maintenance finding.

``Senders`` holds the mail ``Notifier`` (the config's ``smtp``) and a ``WebhookSender`` per
``webhooks`` entry; ``reconfigure`` rebuilds what a reload changed, and ``failed`` counts
every failed mail and webhook call since the start (``tessera_notifications_failed``),
those of replaced senders included. ``PolicyRun`` collects a run's jobs and problems as it
goes; ``Senders.run_digest`` sends its digest (``engine.obs.digest``) by the policy's
``notifications`` and logs ``policy.finished`` at the run's severity;
``Senders.maintenance`` tells ``maintenance.notify`` and ``maintenance.webhooks`` of a
failed gc or verify. Nothing here raises but ``CancelledError``: a failure to notify is
logged and counted by its sender, each send bounded by its timeout.
"""

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from engine.config.models import Config, MaintenanceSection
from engine.config.policy import Notifications, Policy
from engine.daemon.jobs import JobView
from engine.obs import digest
from engine.obs.digest import RunSummary
from engine.obs.notify import Notifier
from engine.obs.summary import Event, JobSummary, job_notice
from engine.obs.webhook import WebhookSender, send_all

log = structlog.get_logger("tessera.daemon")


@dataclass
class PolicyRun:
    """A policy run as it goes: its jobs (backups and their replications) and what went
    wrong outside them."""

    policy: Policy
    started: datetime
    views: list[JobView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the run failed
    warnings: list[str] = field(default_factory=list)

    def summary(self, job_summary: Callable[[JobView], JobSummary]) -> RunSummary:
        """The run's ``RunSummary`` once its jobs have ended (a job not ended is left out)."""
        return RunSummary(
            policy=self.policy.name,
            started=self.started,
            finished=datetime.now(UTC),
            jobs=tuple(job_summary(view) for view in self.views if view.done),
            host=socket.gethostname(),
            problems=tuple(self.problems),
            warnings=tuple(self.warnings),
        )


class Senders:
    """Mail and webhook senders of one configuration (module docstring)."""

    def __init__(self, config: Config) -> None:
        self.notifier = Notifier(config.smtp) if config.smtp is not None else None
        self.webhooks = {w.name: WebhookSender(w) for w in config.webhooks}
        self._replaced_failed = 0  # failures of senders a reload replaced

    @property
    def failed(self) -> int:
        mail = self.notifier.failed if self.notifier else 0
        return self._replaced_failed + mail + sum(w.failed for w in self.webhooks.values())

    def reconfigure(self, config: Config) -> None:
        """Senders for a reloaded ``config``; those whose settings did not change stay."""
        if config.smtp != (self.notifier.smtp if self.notifier else None):
            self._replaced_failed += self.notifier.failed if self.notifier else 0
            self.notifier = Notifier(config.smtp) if config.smtp else None
        if config.webhooks != tuple(w.settings for w in self.webhooks.values()):
            self._replaced_failed += sum(w.failed for w in self.webhooks.values())
            self.webhooks = {w.name: WebhookSender(w) for w in config.webhooks}

    async def run_digest(self, run: RunSummary, rules: Notifications | None) -> None:
        """Log ``policy.finished`` (error: the run raised failure or integrity; warning:
        warnings; else info); then, when the run raised an event ``rules.on`` names, one
        mail to ``rules.to`` and one call to each of ``rules.webhooks``. ``rules`` None (the
        policy went in a reload while it ran): nobody is told."""
        events = digest.run_events(run)
        level = "info"
        if {"integrity", "failure"} & set(events):
            level = "error"
        elif "warning" in events:
            level = "warning"
        getattr(log, level)(
            "policy.finished",
            policy=run.policy,
            title=digest.title(run),
            events=events,
            jobs=[job.job_id for job in run.jobs],
            seconds=run.duration.total_seconds(),
        )
        event = digest.choose_run_event(rules, run) if rules is not None else None
        if rules is None or event is None:
            return
        if self.notifier is not None and rules.to:
            await self.notifier.send_run(run, rules.to, event)
        await send_all(self._webhooks(rules.webhooks), digest.notice(run, event))

    async def maintenance(self, summary: JobSummary, section: MaintenanceSection) -> None:
        """A failed maintenance job (a verify's findings) to ``section.notify`` and
        ``section.webhooks``."""
        event: Event = "integrity" if summary.integrity else "failure"
        if self.notifier is not None and section.notify:
            await self.notifier.send_job(summary, section.notify, event)
        notice = job_notice(summary, event, socket.gethostname())
        await send_all(self._webhooks(section.webhooks), notice)

    def _webhooks(self, names: Sequence[str]) -> list[WebhookSender]:
        # The loader checked the names against this configuration.
        return [self.webhooks[name] for name in names if name in self.webhooks]
