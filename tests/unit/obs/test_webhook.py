"""Webhook bodies (``engine.obs.webhook.payload``): the json document as it stands, Slack's
``text``, a Teams Adaptive Card, Gotify's message with a priority by event."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from engine.obs import digest
from engine.obs.digest import RunSummary
from engine.obs.summary import JobSummary
from engine.obs.webhook import payload

START = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
RUN = RunSummary(
    policy="nightly",
    started=START,
    finished=START + timedelta(minutes=5),
    host="dm01",
    jobs=(
        JobSummary(
            "j-1",
            "backup",
            "web01",
            "succeeded",
            START,
            START + timedelta(minutes=2),
            level="incremental",
            bytes_read=2**30,
            bytes_stored=2**20,
        ),
        JobSummary(
            "j-2",
            "backup",
            "db01",
            "failed",
            START,
            START + timedelta(minutes=1),
            level="full",
            error="disk os: connection reset",
        ),
    ),
)
NOTICE = digest.notice(RUN, "failure")
TITLE = "policy nightly: 1 of 2 VMs FAILED (db01)"
WEB01 = "succeeded, incremental, read 1.0 GiB, stored 1.0 MiB, 0:02:00"


def test_json_is_the_run_document() -> None:
    body = payload("json", NOTICE)
    assert body == digest.document(RUN, "failure")
    assert body["title"] == TITLE
    json.dumps(body)  # serialisable as it stands


def test_slack_text_with_mrkdwn() -> None:
    assert payload("slack", NOTICE) == {
        "text": f"*{TITLE}*\n• *web01*: {WEB01}\n• *db01*: FAILED, full, 0:01:00\n"
        "> db01: disk os: connection reset"
    }


def test_teams_adaptive_card() -> None:
    body = payload("teams", NOTICE)
    assert body["type"] == "message"
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    heading, facts, detail = card["body"]
    assert heading["text"] == TITLE and heading["color"] == "Attention"
    assert facts["type"] == "FactSet"
    assert facts["facts"][0] == {"title": "web01", "value": WEB01}
    assert detail == {"type": "TextBlock", "text": "db01: disk os: connection reset", "wrap": True}
    ok = payload("teams", digest.notice(RUN, "success"))
    assert ok["attachments"][0]["content"]["body"][0]["color"] == "Good"


def test_gotify_message_and_priority() -> None:
    body = payload("gotify", NOTICE)
    assert body == {
        "title": TITLE,
        "message": f"web01: {WEB01}\ndb01: FAILED, full, 0:01:00\n\n"
        "db01: disk os: connection reset",
        "priority": 8,
        "extras": {"client::display": {"contentType": "text/plain"}},
    }
    priorities = {e: payload("gotify", digest.notice(RUN, e))["priority"]  # type: ignore[arg-type]
                  for e in ("integrity", "failure", "warning", "success")}  # fmt: skip
    assert priorities == {"integrity": 10, "failure": 8, "warning": 5, "success": 2}


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="webhook format 'xml'"):
        payload("xml", NOTICE)
