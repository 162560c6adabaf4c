"""Notifications through a real SMTP server (aiosmtpd) on 127.0.0.1: a run's digest by the
policy's rules, a job's message, a test message; plain, STARTTLS with a self-signed
certificate, AUTH PLAIN and LOGIN; a wrong password is a logged error, never an exception."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from engine.config.models import SmtpSection
from engine.config.policy import Notifications
from engine.obs.digest import RunSummary
from engine.obs.notify import Notifier
from engine.obs.summary import DiskSummary, JobSummary
from tests.helpers import capture_all_logs
from tests.integration.selfsigned import CertFiles, make_cert

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55"
SUMMARY = JobSummary(
    job_id="j-77",
    kind="backup",
    vm="vm01",
    state="failed",
    started=datetime(2026, 11, 28, 2, 0, tzinfo=UTC),
    finished=datetime(2026, 11, 28, 2, 1, tzinfo=UTC),
    level="full",
    bytes_read=1 << 20,
    disks=(DiskSummary("os", 1 << 20),),
    error="disk os: connection reset",
)


class Mailbox:
    """aiosmtpd handler and authenticator: keeps envelopes and AUTH mechanisms used."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.mechanisms: list[str] = []
        self.tls_at_data: list[bool] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        self.tls_at_data.append(session.ssl is not None)
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.mechanisms.append(mechanism)
        ok = isinstance(data, LoginPassword) and data.login == b"tessera"
        if ok and data.password == PASSWORD.encode():
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)  # the server answers 535

    def message(self, index: int = 0) -> Message:
        content = self.envelopes[index].content
        assert isinstance(content, bytes)
        return message_from_bytes(content)


@asynccontextmanager
async def smtp_server(mailbox: Mailbox, **options: Any) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(mailbox, hostname="localhost", **options)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def section(port: int, tmp_path: Path, starttls: bool, password: str | None = None) -> SmtpSection:
    password_file = None
    if password is not None:
        password_file = tmp_path / "smtp-password"
        password_file.write_text(password + "\n")
    return SmtpSection(
        host="127.0.0.1",
        sender="tessera@dm01.example.org",
        port=port,
        starttls=starttls,
        username="tessera" if password is not None else None,
        password_file=password_file,
    )


def check_message(mailbox: Mailbox, recipients: list[str]) -> None:
    assert len(mailbox.envelopes) == 1
    envelope = mailbox.envelopes[0]
    assert envelope.mail_from == "tessera@dm01.example.org"
    assert envelope.rcpt_tos == recipients
    msg = mailbox.message()
    assert msg["Subject"] == "[tessera] backup of vm01 FAILED"
    assert msg["To"] == ", ".join(recipients)
    text = msg.get_payload(decode=True)
    assert isinstance(text, bytes)
    lines = text.decode().splitlines()
    assert "Job:      j-77" in lines
    assert "State:    failed" in lines
    assert "Duration: 0:01:00" in lines
    assert "  disk os: connection reset" in lines


async def test_a_run_digest_through_the_policy_rules(tmp_path: Path) -> None:
    ok = JobSummary("j-78", "backup", "vm02", "succeeded", SUMMARY.started,
                    SUMMARY.started + timedelta(minutes=2), level="incremental")  # fmt: skip
    run = RunSummary("nightly", SUMMARY.started, SUMMARY.started + timedelta(minutes=3),
                     (SUMMARY, ok), host="dm01")  # fmt: skip
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        notifier = Notifier(section(port, tmp_path, starttls=False))
        rules = Notifications(on=("failure",), to=("ops@example.org", "dba@example.org"))
        assert await notifier.notify_run(run, rules)
        assert not await notifier.notify_run(run, Notifications(on=("success",), to=rules.to))
        assert not await notifier.notify_run(run, Notifications(on=("failure",)))  # nobody
    (envelope,) = mailbox.envelopes
    assert envelope.rcpt_tos == ["ops@example.org", "dba@example.org"]
    msg = mailbox.message()
    assert msg["Subject"] == "[tessera] policy nightly: 1 of 2 VMs FAILED (vm01)"
    assert (msg["X-Tessera-Policy"], msg["X-Tessera-Event"]) == ("nightly", "failure")
    text = msg.get_payload(decode=True)
    assert isinstance(text, bytes)
    lines = text.decode().splitlines()
    assert "  vm01  FAILED, full, read 1.0 MiB, stored 0 B, 0:01:00" in lines
    assert "  vm02  succeeded, incremental, read 0 B, stored 0 B, 0:02:00" in lines
    assert "  vm01: disk os: connection reset" in lines
    assert (notifier.sent, notifier.failed) == (1, 0)


async def test_a_test_message_reports_its_delivery(tmp_path: Path) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        notifier = Notifier(section(port, tmp_path, starttls=False), local_hostname="dm01")
        sent = await notifier.send_test("ops@example.org", SUMMARY.started)
    assert (sent.ok, sent.detail) == (True, "sent")
    assert sent.target == f"mail ops@example.org via 127.0.0.1:{port}"
    assert mailbox.message()["Subject"] == "[tessera] test message from dm01"
    assert mailbox.message()["X-Tessera-Event"] == "test"
    refused = await notifier.send_test("ops@example.org", SUMMARY.started)  # server gone
    assert not refused.ok and refused.detail.startswith("SMTPConnectError"), refused.detail


async def test_starttls_with_self_signed_certificate(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    mailbox = Mailbox()
    async with smtp_server(
        mailbox, tls_context=cert.server_context(), require_starttls=True
    ) as port:
        notifier = Notifier(
            section(port, tmp_path, starttls=True), tls_context=cert.client_context()
        )
        assert await notifier.send_job(SUMMARY, ["ops@example.org"], "failure")
    check_message(mailbox, ["ops@example.org"])
    assert mailbox.tls_at_data == [True]


async def test_untrusted_certificate_is_a_logged_failure(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    mailbox = Mailbox()
    async with smtp_server(mailbox, tls_context=cert.server_context()) as port:
        notifier = Notifier(section(port, tmp_path, starttls=True))  # system CA bundle
        with capture_all_logs() as logs:
            assert not await notifier.send_job(SUMMARY, ["ops@example.org"], "failure")
    assert mailbox.envelopes == []
    assert notifier.failed == 1
    assert [e["event"] for e in logs] == ["notify.failed"]


def _auth_server(cert: CertFiles, mailbox: Mailbox, exclude: list[str]) -> dict[str, Any]:
    return {
        "tls_context": cert.server_context(),
        "require_starttls": True,
        "authenticator": mailbox.authenticate,
        "auth_required": True,
        "auth_exclude_mechanism": exclude,
    }


@pytest.mark.parametrize(("exclude", "mechanism"), [(["LOGIN"], "PLAIN"), (["PLAIN"], "LOGIN")])
async def test_auth_over_starttls(tmp_path: Path, exclude: list[str], mechanism: str) -> None:
    cert = make_cert(tmp_path)
    mailbox = Mailbox()
    async with smtp_server(mailbox, **_auth_server(cert, mailbox, exclude)) as port:
        smtp = section(port, tmp_path, starttls=True, password=PASSWORD)
        notifier = Notifier(smtp, tls_context=cert.client_context())
        with capture_all_logs() as logs:
            assert await notifier.send_job(SUMMARY, ["ops@example.org"], "failure")
    check_message(mailbox, ["ops@example.org"])
    assert mailbox.mechanisms == [mechanism]
    assert PASSWORD not in repr(logs)


async def test_wrong_password_is_logged_never_raised(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    mailbox = Mailbox()
    wrong = "not-" + PASSWORD
    async with smtp_server(mailbox, **_auth_server(cert, mailbox, [])) as port:
        smtp = section(port, tmp_path, starttls=True, password=wrong)
        notifier = Notifier(smtp, tls_context=cert.client_context())
        with capture_all_logs() as logs:
            assert not await notifier.send_job(SUMMARY, ["ops@example.org"], "failure")
    assert mailbox.envelopes == []
    assert (notifier.sent, notifier.failed) == (0, 1)
    assert len(logs) == 1
    entry = logs[0]
    assert entry["event"] == "notify.failed"
    assert entry["log_level"] == "error"
    assert entry["job"] == "j-77"
    assert "SMTPAuthenticationError" in entry["error"]
    assert wrong not in repr(logs)
    assert PASSWORD not in repr(logs)


async def test_server_down_is_logged_never_raised(tmp_path: Path) -> None:
    mailbox = Mailbox()
    async with smtp_server(mailbox) as port:
        pass  # closed again: nothing listens on the port now
    notifier = Notifier(section(port, tmp_path, starttls=False))
    with capture_all_logs() as logs:
        assert not await notifier.send_job(SUMMARY, ["ops@example.org"], "failure")
    assert notifier.failed == 1
    assert logs[0]["event"] == "notify.failed"
