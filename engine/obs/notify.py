"""E-mail notifications over SMTP (aiosmtplib): a digest per policy run, a message per job.

A policy run ends with one digest (``engine.obs.digest.RunSummary``: every VM the policy
took, its outcome, sizes, duration, warnings) to the policy's ``notifications.to``, sent when
one of the run's events is in ``notifications.on`` (``Notifier.notify_run``). Jobs outside a
policy run (maintenance) send one message each (``JobSummary``, ``Notifier.send_job``).
``Notifier.send_test`` sends a test message and says how it went (``tessera notify test``).

Events, most important first: ``integrity`` (stored data found wrong), ``failure``,
``warning`` (succeeded, with warnings), ``success``. A cancelled job raises none.

A notification never fails a job: every error sending mail is logged (``notify.failed``)
and counted in ``Notifier.failed``; only cancellation propagates. A send takes at most
``timeout`` seconds (``SEND_TIMEOUT``).

Transport: ``starttls`` (default) upgrades the connection before AUTH and refuses a server
that does not offer STARTTLS; port 465 is SMTPS (implicit TLS, RFC 8314). Certificates are
checked against the system's CA bundle unless a ``tls_context`` is given. The password is
read from ``password_file`` at each send (so it can be rotated) and never logged.
"""

import asyncio
import socket
import ssl
from collections.abc import Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog

from engine.obs import digest
from engine.obs.digest import RunSummary
from engine.obs.summary import (
    SUBJECT_PREFIX,
    Delivery,
    Event,
    JobSummary,
    NotificationRules,
    body,
    subject,
)

log = structlog.get_logger("tessera.notify")

SMTPS_PORT = 465
# A mail server that has not answered after this long will not: the job's record is final
# already; the notification is logged as failed instead of holding the daemon's shutdown.
SEND_TIMEOUT = 60.0


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


class Notifier:
    """Sends notifications through one SMTP server. Counters: ``sent``, ``failed``."""

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

    @property
    def server(self) -> str:
        return f"{self.smtp.host}:{self.smtp.port}"

    async def notify_run(self, run: RunSummary, rules: NotificationRules) -> bool:
        """Send the run's digest to ``rules.to`` if the rules want one of its events; True
        if one was sent."""
        event = digest.choose_run_event(rules, run)
        if event is None or not rules.to:
            return False
        return await self.send_run(run, rules.to, event)

    async def send_run(self, run: RunSummary, recipients: Sequence[str], event: Event) -> bool:
        """Send the run's digest; True if the server took it. Never raises (except
        ``CancelledError``): failures are logged and counted."""
        msg = self._message(recipients, digest.subject(run), digest.body(run), run.finished)
        msg["X-Tessera-Policy"] = run.policy
        msg["X-Tessera-Event"] = event
        sent = await self._send(msg, recipients, policy=run.policy, notify_event=event)
        return sent.ok

    def message(self, summary: JobSummary, recipients: Sequence[str], event: Event) -> EmailMessage:
        """The message about one job."""
        when = summary.finished or summary.started
        msg = self._message(recipients, subject(summary, event), body(summary), when)
        msg["X-Tessera-Job"] = summary.job_id
        msg["X-Tessera-Event"] = event
        return msg

    async def send_job(self, summary: JobSummary, recipients: Sequence[str], event: Event) -> bool:
        """Send one message about the job; True if the server took it. Never raises
        (except ``CancelledError``): failures are logged and counted."""
        msg = self.message(summary, recipients, event)
        sent = await self._send(msg, recipients, job=summary.job_id, notify_event=event)
        return sent.ok

    async def send_test(self, recipient: str, now: datetime) -> Delivery:
        """A test message to ``recipient``: whether the server took it, and if not why."""
        text = (
            f"This is a test message from Tessera on {self.local_hostname}, sent "
            f"{now.isoformat(timespec='seconds')} through {self.server} by "
            "`tessera notify test`.\nPolicy runs send their digest the same way.\n"
        )
        subject_line = f"{SUBJECT_PREFIX} test message from {self.local_hostname}"
        msg = self._message([recipient], subject_line, text, now)
        msg["X-Tessera-Event"] = "test"
        return await self._send(msg, [recipient], notify_event="test")

    def _message(
        self, recipients: Sequence[str], subject_line: str, text: str, when: datetime
    ) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.smtp.sender
        msg["To"] = ", ".join(recipients)
        msg["Subject"] = subject_line
        msg["Date"] = format_datetime(when)
        msg["Message-ID"] = make_msgid("tessera", domain=self.local_hostname)
        msg.set_content(text)
        return msg

    async def _send(self, msg: EmailMessage, recipients: Sequence[str], **fields: str) -> Delivery:
        """Send ``msg`` within ``timeout`` seconds in all; log and count the result."""
        target = f"mail {', '.join(recipients)} via {self.server}"
        if not recipients:
            return Delivery(target, ok=False, detail="no recipients")
        try:
            password = await self._password()
            async with asyncio.timeout(self.timeout):
                await aiosmtplib.send(
                    msg,
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
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log.error(  # noqa: TRY400 — a refusal by the mail server needs no traceback
                "notify.failed", server=self.server, error=error, **fields
            )
            return Delivery(target, ok=False, detail=error)
        self.sent += 1
        log.info("notify.sent", to=len(recipients), **fields)
        return Delivery(target, ok=True, detail="sent")

    async def _password(self) -> str | None:
        path = self.smtp.password_file
        if path is None:
            return None
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        return text.rstrip("\r\n")
