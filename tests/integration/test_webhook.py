"""Webhook calls to a real HTTP(S) server on loopback (aiohttp): the body and headers of
each shape, a URL and a token read from files, TLS with a private CA; an error answer, a
redirect, a slow or absent server are logged failures within the timeout, never raised."""

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from engine.config.models import WebhookSection
from engine.obs import digest
from engine.obs.digest import RunSummary
from engine.obs.summary import JobSummary
from engine.obs.webhook import WebhookSender
from tests.integration.selfsigned import make_cert
from tests.integration.webhook_server import Receiver, hook_server

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
JOB = JobSummary("j-1", "backup", "db01", "failed", START, START + timedelta(minutes=1),
                 error="disk os: connection reset")  # fmt: skip
RUN = RunSummary("nightly", START, START + timedelta(minutes=2), (JOB,))
NOTICE = digest.notice(RUN, "failure")


async def test_json_with_a_bearer_token_over_tls(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    (tmp_path / "token").write_text("t0ken\n")
    receiver = Receiver()
    async with hook_server(receiver, cert) as base:
        (tmp_path / "url").write_text(f"{base}/hooks/tessera\n")
        hook = WebhookSection(name="ops", url_file=tmp_path / "url", ca_file=cert.cert,
                              token_file=tmp_path / "token")  # fmt: skip
        sender = WebhookSender(hook)
        with capture_logs() as logs:
            sent = await sender.send(NOTICE)
    assert (sent.ok, sent.detail, sent.target) == (True, "HTTP 200", "webhook ops (json)")
    (call,) = receiver.calls
    assert call.path == "/hooks/tessera"
    assert call.headers["Authorization"] == "Bearer t0ken"
    assert call.headers["Content-Type"] == "application/json"
    assert call.body == digest.document(RUN, "failure")
    assert (sender.sent, sender.failed) == (1, 0)
    # (info events are filtered out when an earlier test left the CLI's WARNING level)
    assert "webhook.failed" not in [e["event"] for e in logs]
    assert "t0ken" not in repr(logs)


async def test_gotify_token_header_and_slack_and_teams_bodies(tmp_path: Path) -> None:
    (tmp_path / "app-token").write_text("AbCdEf\n")
    receiver = Receiver()
    async with hook_server(receiver) as base:
        hooks = [
            WebhookSection(name="phone", url=f"{base}/message", format="gotify",
                           token_file=tmp_path / "app-token"),
            WebhookSection(name="chat", url=f"{base}/services/T0/B0/x", format="slack"),
            WebhookSection(name="teams", url=f"{base}/workflows/1", format="teams"),
        ]  # fmt: skip
        for hook in hooks:
            assert (await WebhookSender(hook).send(NOTICE)).ok
    gotify, slack, teams = receiver.calls
    assert gotify.headers["X-Gotify-Key"] == "AbCdEf" and "Authorization" not in gotify.headers
    assert gotify.body["priority"] == 8 and gotify.body["title"] == NOTICE.title
    assert slack.body["text"].startswith(f"*{NOTICE.title}*\n")
    assert teams.body["attachments"][0]["content"]["type"] == "AdaptiveCard"


async def test_an_error_answer_is_a_logged_failure_with_its_text() -> None:
    receiver = Receiver(status=404, answer="no_service")
    async with hook_server(receiver) as base:
        sender = WebhookSender(WebhookSection(name="chat", url=f"{base}/x", format="slack"))
        with capture_logs() as logs:
            sent = await sender.send(NOTICE)
    assert (sent.ok, sent.detail) == (False, "WebhookError: HTTP 404: no_service")
    assert (sender.sent, sender.failed) == (0, 1)
    (entry,) = logs
    assert entry["event"] == "webhook.failed" and entry["log_level"] == "error"
    assert entry["webhook"] == "chat" and entry["error"] == sent.detail


async def test_a_redirect_is_not_followed() -> None:
    receiver = Receiver(redirect="/elsewhere")
    async with hook_server(receiver) as base:
        sent = await WebhookSender(WebhookSection(name="x", url=f"{base}/a")).send(NOTICE)
    assert not sent.ok and sent.detail.startswith("WebhookError: HTTP 307")
    assert [c.path for c in receiver.calls] == ["/a"]


async def test_a_slow_server_costs_the_timeout_and_no_more() -> None:
    receiver = Receiver(delay=30)
    async with hook_server(receiver) as base:
        sender = WebhookSender(WebhookSection(name="slow", url=f"{base}/a", timeout=0.5))
        began = time.monotonic()
        sent = await sender.send(NOTICE)
        took = time.monotonic() - began
    assert (sent.ok, sent.detail) == (False, "no answer in 0.5 s")
    assert 0.5 <= took < 5


async def test_nobody_listening_is_a_logged_failure() -> None:
    receiver = Receiver()
    async with hook_server(receiver) as base:
        pass  # closed again: nothing listens there now
    sender = WebhookSender(WebhookSection(name="gone", url=f"{base}/a"))
    with capture_logs() as logs:
        sent = await sender.send(NOTICE)
    assert not sent.ok and "ClientConnectorError" in sent.detail
    assert [e["event"] for e in logs] == ["webhook.failed"]


async def test_a_bad_url_from_its_file_is_not_logged(tmp_path: Path) -> None:
    secret = "https://hooks.example.com:99999/services/T0/B0/s3cr3t"
    (tmp_path / "url").write_text(secret + "\n")
    (tmp_path / "empty").write_text("\n")
    with capture_logs() as logs:
        bad = await WebhookSender(WebhookSection(name="x", url_file=tmp_path / "url")).send(NOTICE)
        empty = await WebhookSender(WebhookSection(name="y", url_file=tmp_path / "empty")).send(
            NOTICE
        )
    assert (bad.ok, bad.detail) == (False, "WebhookError: the webhook's url is not a valid URL")
    assert (empty.ok, empty.detail) == (False, f"WebhookError: {tmp_path / 'empty'} is empty")
    assert "s3cr3t" not in repr(logs)
