"""Webhook notifications: one HTTP POST with a JSON body per notice, in the shape the
receiving service expects (``format`` of the target).

``payload(format, notice)`` builds the body (pure; ``docs/DESIGN.md`` §7 shows each):

- ``json``: Tessera's own document (``engine.obs.digest.document`` for a policy run,
  ``engine.obs.summary.job_doc`` inside ``{"type": "tessera.job", ...}`` for a job);
  ``token_file`` is sent as ``Authorization: Bearer``.
- ``slack``: ``{"text": ...}`` with Slack mrkdwn (``*bold*``, a bullet per VM); Slack's
  incoming webhooks, and Mattermost's and Rocket.Chat's, take it.
- ``teams``: a message with one Adaptive Card (title, a fact per VM, details), what a
  Microsoft Teams *Workflows* webhook ("When a Teams webhook request is received") posts.
- ``gotify``: ``{"title", "message", "priority", "extras"}`` for Gotify's
  ``POST /message``; ``token_file`` is the application token (``X-Gotify-Key``).
  Priority: integrity 10, failure 8, warning 5, success and test 2.

``WebhookSender.send`` posts one notice to one target: the URL is read at each send (from
``url`` or ``url_file``, so a secret URL such as Slack's stays out of the config), the whole
request is bounded by the target's ``timeout``, a redirect is not followed, and any answer
but 2xx is a failure. A webhook never fails a job: every error is logged
(``webhook.failed``) and counted (``failed``); only cancellation propagates.
"""

import asyncio
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from engine.obs.summary import Delivery, Notice

log = structlog.get_logger("tessera.webhook")

FORMATS = ("json", "slack", "teams", "gotify")
GOTIFY_PRIORITY = {"integrity": 10, "failure": 8, "warning": 5, "success": 2, "test": 2}
TEAMS_COLOR = {"integrity": "Attention", "failure": "Attention", "warning": "Warning"}
# Of an error answer, this much of the body goes into the log: enough for the service's
# error message, never a whole HTML page.
ERROR_BODY = 300


class WebhookSettings(Protocol):
    """``engine.config.models.WebhookSection`` (named by shape: obs sits below config)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str | None: ...
    @property
    def url_file(self) -> Path | None: ...
    @property
    def format(self) -> str: ...
    @property
    def token_file(self) -> Path | None: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def timeout(self) -> float: ...


def payload(fmt: str, notice: Notice) -> dict[str, Any]:
    """The JSON body of ``notice`` in the shape ``fmt`` (one of ``FORMATS``)."""
    if fmt == "json":
        return notice.document
    if fmt == "slack":
        lines = [f"*{notice.title}*"]
        lines += [f"• *{name}*: {value}" for name, value in notice.facts]
        lines += [f"> {line}" for line in notice.details]
        return {"text": "\n".join(lines)}
    if fmt == "teams":
        return _teams(notice)
    if fmt == "gotify":
        lines = [f"{name}: {value}" for name, value in notice.facts]
        message = "\n".join([*lines, *([""] if lines and notice.details else []), *notice.details])
        return {
            "title": notice.title,
            "message": message or notice.title,
            "priority": GOTIFY_PRIORITY[notice.event],
            "extras": {"client::display": {"contentType": "text/plain"}},
        }
    raise ValueError(f"webhook format {fmt!r}: one of {', '.join(FORMATS)}")


def _teams(notice: Notice) -> dict[str, Any]:
    card: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": notice.title,
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
            "color": TEAMS_COLOR.get(
                notice.event, "Good" if notice.event == "success" else "Default"
            ),
        }
    ]
    if notice.facts:
        facts = [{"title": name, "value": value} for name, value in notice.facts]
        card.append({"type": "FactSet", "facts": facts})
    card += [{"type": "TextBlock", "text": line, "wrap": True} for line in notice.details]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": card,
                },
            }
        ],
    }


class WebhookSender:
    """Posts notices to one webhook target. Counters: ``sent``, ``failed``."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.sent = 0
        self.failed = 0

    @property
    def target(self) -> str:
        return f"webhook {self.settings.name} ({self.settings.format})"

    async def send(self, notice: Notice) -> Delivery:
        """POST the notice; the result says whether the target answered 2xx. Never raises
        (except ``CancelledError``): failures are logged and counted."""
        name = self.settings.name
        try:
            async with asyncio.timeout(self.settings.timeout):
                status = await self._post(payload(self.settings.format, notice))
        except Exception as exc:  # noqa: BLE001 — a notification never fails the job
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if isinstance(exc, TimeoutError):
                error = f"no answer in {self.settings.timeout:g} s"
            self.failed += 1
            log.error("webhook.failed", webhook=name, notify_event=notice.event, error=error)  # noqa: TRY400
            return Delivery(self.target, ok=False, detail=error)
        self.sent += 1
        log.info("webhook.sent", webhook=name, notify_event=notice.event, status=status)
        return Delivery(self.target, ok=True, detail=f"HTTP {status}")

    async def _post(self, body: dict[str, Any]) -> int:
        settings = self.settings
        url = await _read(settings.url_file) if settings.url_file else settings.url
        if not url:
            raise WebhookError(f"{settings.url_file} is empty")
        headers = {"User-Agent": "tessera"}
        if settings.token_file is not None:
            token = await _read(settings.token_file)
            if settings.format == "gotify":
                headers["X-Gotify-Key"] = token
            else:
                headers["Authorization"] = f"Bearer {token}"
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file is not None else None
        )
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    url, json=body, headers=headers, ssl=context, allow_redirects=False
                ) as response,
            ):
                if not 200 <= response.status < 300:
                    text = (await response.text(errors="replace"))[:ERROR_BODY].strip()
                    raise WebhookError(f"HTTP {response.status}" + (f": {text}" if text else ""))
                return response.status
        except aiohttp.InvalidURL:
            # Without the URL (aiohttp's message has it): from url_file, it may be a secret.
            raise WebhookError("the webhook's url is not a valid URL") from None


class WebhookError(Exception):
    """The target answered, but not with 2xx; or there is no valid URL to call."""


async def _read(path: Path) -> str:
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    return text.strip()


async def send_all(senders: Iterable[WebhookSender], notice: Notice) -> list[Delivery]:
    """Send ``notice`` to every sender, one after the other (each bounded by its timeout)."""
    return [await sender.send(notice) for sender in senders]
