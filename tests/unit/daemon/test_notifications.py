"""The daemon's senders across a reload (``engine.daemon.notifications.Senders``): unchanged
settings keep their senders, changed ones get new senders, and failures counted by the old
ones stay in ``failed`` (``tessera_notifications_failed`` never goes down)."""

from datetime import UTC, datetime

import msgspec

from engine.config.models import Config, SmtpSection, WebhookSection
from engine.daemon.jobs import JobView
from engine.daemon.notifications import Senders
from engine.daemon.service import job_summary
from engine.jobs.backup import BackupOutcome
from engine.jobs.journal import JobRecord
from engine.jobs.states import State
from engine.obs.summary import JobSummary, job_notice
from engine.pipeline.disk import DiskStats

NOW = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
DEAD = "http://127.0.0.1:1/hook"  # port 1: nothing listens, the connection is refused


async def test_reconfigure_keeps_unchanged_senders_and_counts_across_reloads() -> None:
    hook = WebhookSection(name="chat", url=DEAD, timeout=5)
    smtp = SmtpSection(host="127.0.0.1", sender="tessera@example.org", port=1)
    config = Config(smtp=smtp, webhooks=(hook,))
    senders = Senders(config)
    notice = job_notice(JobSummary("j-1", "verify", None, "failed", NOW), "failure", "dm01")
    assert not (await senders.webhooks["chat"].send(notice)).ok
    assert senders.failed == 1

    notifier, chat = senders.notifier, senders.webhooks["chat"]
    senders.reconfigure(msgspec.structs.replace(config))  # the same settings again
    assert senders.notifier is notifier and senders.webhooks["chat"] is chat

    other = WebhookSection(name="phone", url=DEAD, format="gotify", timeout=5)
    senders.reconfigure(msgspec.structs.replace(config, webhooks=(other,), smtp=None))
    assert senders.notifier is None and list(senders.webhooks) == ["phone"]
    assert senders.failed == 1  # the replaced sender's failure is still counted
    assert not (await senders.webhooks["phone"].send(notice)).ok
    assert senders.failed == 2


def test_a_backup_mail_names_its_disks_and_how_each_was_read() -> None:
    """Per-disk lines of a backup's mail: the disk's name (its id only beside a shared
    name), the kind of read and a fallback's reason; never the pipeline's summary line."""
    stats = [
        DiskStats("id-os", 100, name="os", bytes_read=10),
        DiskStats("id-a", 100, name="data", fallback_reason="bitmap missing: full read"),
        DiskStats("id-b", 100, name="data"),
    ]
    record = JobRecord("j1", "backup", "memory", State.SUCCEEDED)
    view = JobView("j1", "backup", "web01", state="succeeded")
    view.outcome = BackupOutcome(record, None, "incremental", disks=stats)
    summary = job_summary(view)
    assert [(d.name, d.read, d.note) for d in summary.disks] == [
        ("os", "dirty", None),
        ("data (id-a)", "full", "bitmap missing: full read"),
        ("data (id-b)", "dirty", None),
    ]
    view.outcome = BackupOutcome(record, None, "full", disks=stats[:1])
    assert [(d.name, d.read) for d in job_summary(view).disks] == [("os", "full")]
