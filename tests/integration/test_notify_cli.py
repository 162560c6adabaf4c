"""``tessera notify test`` through a configuration, against real servers on loopback: a
test mail per address (aiosmtpd) and a call per webhook (aiohttp), each result printed; a
target that fails makes the exit 1, without stopping the others."""

import json
from pathlib import Path

import pytest

from tests.daemon_setup import daemon_config
from tests.e2e.test_daemon import tessera
from tests.integration.test_smtp import Mailbox, smtp_server
from tests.integration.webhook_server import Receiver, hook_server

pytestmark = pytest.mark.integration


def make_config(tmp_path: Path, smtp_port: int, base: str, dead: str) -> Path:
    (tmp_path / "engine-password").write_text("unused\n")
    (tmp_path / "gotify-token").write_text("AbC\n")
    config = daemon_config(
        tmp_path,
        "notify-cli",
        "engines:\n  - name: lab\n    url: https://127.0.0.1:1/ovirt-engine/api\n"
        f"    username: admin@internal\n    password_file: {tmp_path / 'engine-password'}\n"
        f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
        "  from: tessera@dm01.example.org\n"
        "maintenance:\n  notify: [dba@example.org, ops@example.org]\n"
        f"webhooks:\n  - {{name: chat, url: '{base}/chat', format: slack}}\n"
        f"  - name: phone\n    url: {dead}/message\n    format: gotify\n"
        f"    token_file: {tmp_path / 'gotify-token'}\n    timeout: 2\n",
    )
    (tmp_path / "policies.d").mkdir()
    (tmp_path / "policies.d" / "nightly.yaml").write_text(
        "name: nightly\nselection:\n  vms: [web01]\n"
        "notifications:\n  on: [failure]\n  to: [ops@example.org]\n  webhooks: [chat]\n"
    )
    return config


async def test_notify_test_reports_each_target(tmp_path: Path) -> None:
    gone = Receiver()
    async with hook_server(gone) as dead:
        pass  # nothing listens there now
    mailbox = Mailbox()
    receiver = Receiver()
    async with smtp_server(mailbox) as smtp_port, hook_server(receiver) as base:
        config = make_config(tmp_path, smtp_port, base, dead)
        code, out = await tessera("notify", "test", "--config", config, "--json", timeout=60)
        assert code == 1, out  # the dead webhook
        results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [(r["target"], r["ok"]) for r in results] == [
            (f"mail ops@example.org via 127.0.0.1:{smtp_port}", True),
            (f"mail dba@example.org via 127.0.0.1:{smtp_port}", True),
            ("webhook chat (slack)", True),
            ("webhook phone (gotify)", False),
        ]
        assert "ClientConnectorError" in results[3]["detail"]
        assert [e.rcpt_tos for e in mailbox.envelopes] == [["ops@example.org"], ["dba@example.org"]]
        assert "test message" in mailbox.message()["Subject"]
        (call,) = receiver.calls
        assert call.body["text"].startswith("*Tessera test notification from ")

        code, out = await tessera(
            "notify", "test", "--config", config, "--to", "me@example.org",
            "--webhook", "chat", timeout=60,
        )  # fmt: skip
        assert code == 0, out
        assert out.splitlines()[-2:] == [
            f"mail me@example.org via 127.0.0.1:{smtp_port}: ok (sent)",
            "webhook chat (slack): ok (HTTP 200)",
        ]
        code, out = await tessera("notify", "test", "--config", config, "--webhook", "nope")
        assert code == 2 and "no webhook named 'nope'" in out, out
