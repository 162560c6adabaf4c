"""Issue 16's done-when for notifications: a policy run through the real daemon (``Service``
with an in-memory hypervisor registered as a plugin) sends one digest mail, received by a
real SMTP server (aiosmtpd), and one webhook call, received by a real HTTP server
(aiohttp) — for two VMs, one of which fails, not one message per VM. A run the rules do not
want to hear of sends nothing; an unreachable webhook never fails the run."""

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.daemon_setup import CHUNK, daemon_config, running
from tests.helpers import capture_all_logs, realistic_bytes
from tests.integration.test_new_hypervisor import MemoryHypervisor, installed
from tests.integration.test_smtp import Mailbox, smtp_server
from tests.integration.webhook_server import Receiver, hook_server
from tests.memory import MemoryDisk, MemoryVm

pytestmark = pytest.mark.integration

PASSPHRASE = "policy-notifications"


def vms() -> dict[str, MemoryVm]:
    async def reset(disk: MemoryDisk, offset: int, length: int) -> None:
        raise ConnectionResetError("imageio: connection reset by peer")

    web = MemoryDisk("d1", "web1_os", bytearray(realistic_bytes(4 * CHUNK, seed=1)))
    db = MemoryDisk("d2", "db1_os", bytearray(realistic_bytes(4 * CHUNK, seed=2)))
    db.before_read = reset
    return {
        "web1": MemoryVm("vm-1", "web1", [web]),
        "db1": MemoryVm("vm-2", "db1", [db]),
    }


def make_config(tmp_path: Path, smtp_port: int, hook_url: str, on: str) -> Path:
    (tmp_path / "engine-password").write_text("unused\n")
    (tmp_path / "hook-url").write_text(hook_url + "\n")
    config = daemon_config(
        tmp_path,
        PASSPHRASE,
        "engines:\n  - name: mem\n    url: memory://\n    username: nobody\n"
        f"    password_file: {tmp_path / 'engine-password'}\n    plugin: memory\n"
        f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
        "  from: tessera@dm01.example.org\n"
        f"webhooks:\n  - name: chat\n    url_file: {tmp_path / 'hook-url'}\n    format: json\n"
        "    timeout: 2\n",
    )
    policies = tmp_path / "policies.d"
    policies.mkdir()
    (policies / "nightly.yaml").write_text(
        "name: nightly\nselection:\n  vms: [web1, db1]\n"
        f"notifications:\n  on: {on}\n  to: [ops@example.org]\n  webhooks: [chat]\n"
    )
    return config


async def test_a_policy_run_sends_one_digest_and_one_webhook_call(tmp_path: Path) -> None:
    mailbox = Mailbox()
    receiver = Receiver()
    async with smtp_server(mailbox) as smtp_port, hook_server(receiver) as base:
        config = make_config(tmp_path, smtp_port, f"{base}/hooks/tessera", "[failure, integrity]")
        with installed(MemoryHypervisor(vms())):
            async with running(config) as service:
                (policy,) = service.policies
                with capture_all_logs() as logs:
                    await service.run_policy(policy, datetime.now(UTC))
                jobs = {view.vm: view for view in service.jobs.jobs()}
    assert (jobs["web1"].state, jobs["db1"].state) == ("succeeded", "failed")

    (envelope,) = mailbox.envelopes  # one digest for the run, not one mail per VM
    assert envelope.rcpt_tos == ["ops@example.org"]
    message = mailbox.message()
    assert message["Subject"] == "[tessera] policy nightly: 1 of 2 VMs FAILED (db1)"
    payload = message.get_payload(decode=True)
    assert isinstance(payload, bytes)
    text = payload.decode()
    assert "  web1  succeeded, full, read 256.0 KiB" in text
    assert "  db1   FAILED, full" in text
    assert "ConnectionResetError: imageio: connection reset by peer" in text  # not a repr
    assert "  db1: disk d2 at offset " in text
    assert f"  web1: {jobs['web1'].job_id}" in text

    (call,) = receiver.calls  # one webhook call
    assert call.path == "/hooks/tessera"
    doc = call.body
    assert (doc["type"], doc["policy"], doc["event"]) == (
        "tessera.policy_run",
        "nightly",
        "failure",
    )
    assert doc["counts"]["jobs"] == 2 and doc["counts"]["failed"] == 1
    by_vm = {job["vm"]: job for job in doc["jobs"]}
    assert by_vm["web1"]["outcome"] == "succeeded" and by_vm["web1"]["bytes_read"] == 4 * CHUNK
    assert by_vm["db1"]["outcome"] == "FAILED" and "connection reset" in by_vm["db1"]["error"]
    datetime.fromisoformat(doc["finished"])  # ISO 8601

    (finished,) = [e for e in logs if e["event"] == "policy.finished"]
    assert finished["log_level"] == "error"  # a VM failed: syslog err
    assert finished["events"] == ("failure",)
    json.dumps(finished["jobs"])


async def test_a_run_the_rules_do_not_want_and_an_unreachable_webhook(tmp_path: Path) -> None:
    mailbox = Mailbox()
    receiver = Receiver()
    async with hook_server(receiver) as base:
        pass  # closed: nothing listens there now
    async with smtp_server(mailbox) as smtp_port:
        config = make_config(tmp_path, smtp_port, f"{base}/hooks", "[success]")
        with installed(MemoryHypervisor(vms())):
            async with running(config) as service:
                (policy,) = service.policies
                with capture_all_logs() as logs:
                    await service.run_policy(policy, datetime.now(UTC))
                    # a run that raised "failure" only: [success] hears nothing
                    assert mailbox.envelopes == [] and receiver.calls == []
                    healthy = MemoryHypervisor({"web1": vms()["web1"]})
                    with installed(healthy):
                        await asyncio.wait_for(service.run_policy(policy, datetime.now(UTC)), 60)
                failed = service.notifications.failed
    assert len(mailbox.envelopes) == 1  # the second run succeeded: its digest went out
    assert "web1 succeeded" in mailbox.message()["Subject"]
    assert failed == 1  # the webhook: logged and counted, the run unharmed
    assert [e["webhook"] for e in logs if e["event"] == "webhook.failed"] == ["chat"]
