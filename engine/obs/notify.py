"""E-mail notifications: one plain-text message per finished job, over SMTP (aiosmtplib).

The daemon fills a ``JobSummary`` when a job ends, asks ``choose_event`` whether the policy's
``notifications`` want to hear about it, and awaits ``Notifier.notify`` (or ``send_job``
directly). A notification never fails a job: every error sending mail is logged
(``notify.failed``) and counted in ``Notifier.failed``; only cancellation propagates.

Transport: ``starttls`` (default) upgrades the connection before AUTH and refuses a server
that does not offer STARTTLS; port 465 is SMTPS (implicit TLS, RFC 8314). Certificates are
checked against the system's CA bundle unless a ``tls_context`` is given. The password is
read from ``password_file`` at each send (so it can be rotated) and never logged.
"""

import asyncio
import socket
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Literal, Protocol

import aiosmtplib
import structlog

from engine.core.units import human_bytes

log = structlog.get_logger("tessera.notify")

Event = Literal["failure", "success", "integrity"]  # config.policy.Event (obs sits below config)
SMTPS_PORT = 465
# A mail server that has not answered after this long will not: the job's record is final
# already; the notification is logged as failed instead of holding the daemon's shutdown.
SEND_TIMEOUT = 60.0
SUBJECT_PREFIX = "[tessera]"


class SmtpSettings(Protocol):
    """``engine.config.models.SmtpSection`` (named by shape: obs sits below config)."""

    @property
    def host(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def starttls(self) -> bool: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password_file(self) -> Path | None: ...


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
    notes: tuple[str, ...] = ()
    error: str | None = None
    integrity: bool = False  # stored data was found wrong (an IntegrityError)

    @property
    def duration(self) -> timedelta | None:
        return self.finished - self.started if self.finished is not None else None


def events_of(summary: JobSummary) -> tuple[Event, ...]:
    """The events a finished job raises, most important first."""
    events: list[Event] = ["integrity"] if summary.integrity else []
    if summary.state == "failed":
        events.append("failure")
    elif summary.state == "succeeded":
        events.append("success")
    return tuple(events)  # a cancelled job was someone's choice: nothing to report


def choose_event(rules: NotificationRules, summary: JobSummary) -> Event | None:
    """The event to send mail about (the most important one the rules listen to), or None
    when the rules have no recipients or want none of the job's events."""
    if not rules.to:
        return None
    return next((event for event in events_of(summary) if event in rules.on), None)


def subject(summary: JobSummary, event: Event) -> str:
    what = f"{summary.kind} of {summary.vm}" if summary.vm else f"{summary.kind} {summary.job_id}"
    outcome = {"failure": "FAILED", "success": "succeeded", "integrity": "INTEGRITY ERROR"}
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


class Notifier:
    """Sends job notifications through one SMTP server. Counters: ``sent``, ``failed``."""

    def __init__(
        self,
        smtp: SmtpSettings,
        *,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
        timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.smtp = smtp
        self.tls_context = tls_context or ssl.create_default_context()
        self.local_hostname = local_hostname or socket.getfqdn()
        self.timeout = timeout
        self.sent = 0
        self.failed = 0

    async def notify(self, summary: JobSummary, rules: NotificationRules) -> bool:
        """Send the mail the rules ask for, if any; True if one was sent."""
        event = choose_event(rules, summary)
        if event is None:
            return False
        return await self.send_job(summary, rules.to, event)

    def message(self, summary: JobSummary, recipients: Sequence[str], event: Event) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.smtp.sender
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = subject(summary, event)
        msg["Date"] = format_datetime(summary.finished or summary.started)
        msg["Message-ID"] = make_msgid("tessera", domain=self.local_hostname)
        msg["X-Tessera-Job"] = summary.job_id
        msg["X-Tessera-Event"] = event
        msg.set_content(body(summary))
        return msg

    async def send_job(self, summary: JobSummary, recipients: Sequence[str], event: Event) -> bool:
        """Send one message about the job; True if the server took it. Never raises
        (except ``CancelledError``): failures are logged and counted."""
        if not recipients:
            return False
        try:
            password = await self._password()
            await aiosmtplib.send(
                self.message(summary, recipients, event),
                sender=self.smtp.sender,
                recipients=list(recipients),
                hostname=self.smtp.host,
                port=self.smtp.port,
                username=self.smtp.username,
                password=password,
                use_tls=self.smtp.port == SMTPS_PORT,
                start_tls=self.smtp.starttls and self.smtp.port != SMTPS_PORT,
                tls_context=self.tls_context,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
            )
        except Exception as exc:  # noqa: BLE001 — a notification never fails the job
            self.failed += 1
            log.error(  # noqa: TRY400 — a refusal by the mail server needs no traceback
                "notify.failed",
                job=summary.job_id,
                notify_event=event,
                server=f"{self.smtp.host}:{self.smtp.port}",
                error=f"{type(exc).__name__}: {exc}",
            )
            return False
        self.sent += 1
        log.info("notify.sent", job=summary.job_id, notify_event=event, to=len(recipients))
        return True

    async def _password(self) -> str | None:
        path = self.smtp.password_file
        if path is None:
            return None
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        return text.rstrip("\r\n")
