"""``tessera check-config --deep`` against the lab: the fake engine (real ovirtsdk4 over TLS,
SSO), a real encrypted store, aiosmtpd, a TCP syslog receiver and a webhook receiver.

A working configuration reports every item ok (exit 0) and posts, mails and writes nothing.
A broken one reports each broken item with a hint (exit 1), and only those: a wrong engine
password, a CA that did not issue the engine's certificate, a store never initialised, a
store's wrong passphrase, a DataMover name no VM has, an SMTP port nothing listens on, a
syslog port that refuses, a webhook nobody serves.
"""

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.units import MiB
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.tls import LabCa
from tests.daemon_setup import daemon_config
from tests.e2e.test_daemon import tessera
from tests.integration.test_smtp import Mailbox, smtp_server
from tests.integration.test_syslog import StreamReceiver
from tests.integration.webhook_server import Receiver, hook_server

pytestmark = pytest.mark.integration

SEED = Seed(
    vms=(
        VmSeed(name="web01", disks=(DiskSeed("web01_os", 64 * MiB, bootable=True),)),
        VmSeed(name="dm01", disks=(DiskSeed("dm01_os", 64 * MiB, bootable=True),)),
    )
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    (tmp_path / "engine").mkdir()
    async with FakeEngine(SEED, tmp_path / "engine") as fake:
        yield fake


def closed_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_yaml(name: str, engine: FakeEngine, password_file: Path, ca_file: Path) -> str:
    return (
        f"  - name: {name}\n    url: {engine.url}\n    username: {engine.username}\n"
        f"    password_file: {password_file}\n    ca_file: {ca_file}\n"
    )


def report(out: str) -> dict[str, tuple[str, str]]:
    """``--deep``'s lines: item → (status, the rest of the line with any hint under it)."""
    lines = out.split("deep check:\n", 1)[1].splitlines()
    items: dict[str, tuple[str, str]] = {}
    last = ""
    for line in lines[:-1]:
        if line.startswith("          hint: "):
            status, text = items[last]
            items[last] = (status, text + "\n" + line.strip())
            continue
        status, rest = line.split(maxsplit=1)
        for prefix in ("engine", "store", "smtp", "syslog", "webhook"):
            if rest.startswith(prefix):
                last = (
                    rest.split(": ", 1)[0]
                    if prefix != "engine"
                    else ": ".join(rest.split(": ", 2)[:2])
                )
        items[last] = (status, rest)
    return items


async def test_a_working_configuration_reports_every_item_ok(
    tmp_path: Path, engine: FakeEngine
) -> None:
    mailbox, receiver, syslog = Mailbox(), Receiver(), StreamReceiver()
    (tmp_path / "engine-password").write_text(engine.password + "\n")
    async with smtp_server(mailbox) as smtp_port, hook_server(receiver) as base:
        config = daemon_config(
            tmp_path,
            "deep-check",
            "engines:\n"
            + engine_yaml("lab", engine, tmp_path / "engine-password", engine.ca_file)
            + "datamover:\n  vm_name: dm01\n"
            f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
            "  from: tessera@dm01.example.org\n"
            f"syslog:\n  host: 127.0.0.1\n  port: {syslog.port}\n  protocol: tcp\n"
            f"webhooks:\n  - {{name: chat, url: '{base}/hooks/secret', format: slack}}\n",
        )
        code, out = await tessera("check-config", "--config", config, "--deep", timeout=120)
    assert code == 0, out
    items = report(out)
    assert {item: status for item, (status, _) in items.items()} == {
        "engine lab: reachable": "ok",
        "engine lab: CA": "ok",
        "engine lab: credentials": "ok",
        "engine lab: DataMover VM": "ok",
        "store main": "ok",
        f"smtp 127.0.0.1:{smtp_port}": "ok",
        f"syslog tcp://127.0.0.1:{syslog.port}": "ok",
        "webhook chat": "ok",
    }, out
    assert f"logged in as {engine.username}" in items["engine lab: credentials"][1]
    assert "dm01" in items["engine lab: DataMover VM"][1]
    assert "0 snapshots" in items["store main"][1]
    assert "secret" not in out  # a webhook's path may be its secret
    assert out.splitlines()[-1] == "8 ok, 0 failed, 0 skipped"
    assert mailbox.envelopes == [] and receiver.calls == []  # nothing sent


async def test_each_broken_item_is_reported_with_a_hint(tmp_path: Path, engine: FakeEngine) -> None:
    (tmp_path / "engine-password").write_text(engine.password + "\n")
    (tmp_path / "wrong-password").write_text("not-the-password\n")
    (tmp_path / "other-ca").mkdir()
    other_ca = LabCa().issue(tmp_path / "other-ca").ca_file
    (tmp_path / "wrong-pass").write_text("not-the-passphrase\n")
    smtp_port, syslog_port, hook_port = closed_port(), closed_port(socket.SOCK_DGRAM), closed_port()
    config = daemon_config(
        tmp_path,
        "deep-check",
        "engines:\n"
        + engine_yaml("bad-password", engine, tmp_path / "wrong-password", engine.ca_file)
        + engine_yaml("bad-ca", engine, tmp_path / "engine-password", other_ca)
        + "datamover:\n  vm_name: nope\n"
        f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
        "  from: tessera@dm01.example.org\n"
        f"syslog:\n  host: 127.0.0.1\n  port: {syslog_port}\n  protocol: udp\n"
        f"webhooks:\n  - {{name: chat, url: 'http://127.0.0.1:{hook_port}/x', format: slack}}\n",
    )
    # Two more stores: one never initialised, the main one's with a wrong passphrase.
    text = config.read_text().replace(
        "api:\n",
        f"  - name: missing\n    path: {tmp_path / 'never-made'}\n"
        f"    passphrase_file: {tmp_path / 'pass'}\n"
        f"  - name: wrong\n    path: {tmp_path / 'store'}\n"
        f"    passphrase_file: {tmp_path / 'wrong-pass'}\n"
        "api:\n",
        1,
    )
    config.write_text(text)
    code, out = await tessera("check-config", "--config", config, "--deep", timeout=120)
    assert code == 1, out
    items = report(out)
    statuses = {item: status for item, (status, _) in items.items()}
    assert statuses == {
        "engine bad-password: reachable": "ok",
        "engine bad-password: CA": "ok",
        "engine bad-password: credentials": "FAILED",
        "engine bad-password: DataMover VM": "skipped",
        "engine bad-ca: reachable": "ok",
        "engine bad-ca: CA": "FAILED",
        "engine bad-ca: credentials": "skipped",
        "engine bad-ca: DataMover VM": "skipped",
        "store main": "ok",
        "store missing": "FAILED",
        "store wrong": "FAILED",
        f"smtp 127.0.0.1:{smtp_port}": "FAILED",
        f"syslog udp://127.0.0.1:{syslog_port}": "FAILED",
        "webhook chat": "FAILED",
    }, out
    credentials = items["engine bad-password: credentials"][1]
    assert "authentication failed" in credentials
    assert f"hint: check username '{engine.username}'" in credentials
    assert "not-the-password" not in out
    ca = items["engine bad-ca: CA"][1]
    assert "HTTP None" not in ca
    assert "the engine's TLS certificate is not trusted (unable to get local issuer" in ca
    assert f"hint: ca_file {other_ca} is not the CA that issued the engine's certificate" in ca
    assert "not a Tessera store" in items["store missing"][1]
    assert (
        f"hint: create it: tessera store init {tmp_path / 'never-made'}"
        in items["store missing"][1]
    )
    assert "wrong passphrase" in items["store wrong"][1]
    assert "ConnectionRefusedError" in items[f"smtp 127.0.0.1:{smtp_port}"][1] or (
        "SMTPConnectError" in items[f"smtp 127.0.0.1:{smtp_port}"][1]
    )
    assert "hint: is host:port right" in items[f"smtp 127.0.0.1:{smtp_port}"][1]
    assert "ConnectionRefusedError" in items[f"syslog udp://127.0.0.1:{syslog_port}"][1]
    assert "ConnectionRefusedError" in items["webhook chat"][1]
    assert out.splitlines()[-1] == "4 ok, 7 failed, 3 skipped"

    # --json: the same report as one document, for monitoring; the same exit status
    code, out = await tessera("check-config", "--config", config, "--deep", "--json", timeout=120)
    assert code == 1, out
    doc = json.loads(out)
    assert doc["ok"] is False and doc["errors"] == [] and doc["files"] == [str(config)]
    assert {c["item"]: c["status"] for c in doc["checks"]} == statuses
    by_item = {c["item"]: c for c in doc["checks"]}
    assert by_item["store missing"]["hint"].startswith(
        f"create it: tessera store init {tmp_path / 'never-made'}"
    )

    # and a configuration that does not load: its errors, exit 1
    config.write_text("stores: [\n")
    code, out = await tessera("check-config", "--config", config, "--json")
    assert code == 1, out
    broken = json.loads(out)
    assert broken["ok"] is False and broken["checks"] == [] and broken["errors"], broken


async def test_a_datamover_nothing_needs_is_skipped_not_failed(
    tmp_path: Path, engine: FakeEngine
) -> None:
    (tmp_path / "engine-password").write_text(engine.password + "\n")
    config = daemon_config(
        tmp_path,
        "deep-check",
        "engines:\n" + engine_yaml("lab", engine, tmp_path / "engine-password", engine.ca_file),
    )
    code, out = await tessera("check-config", "--config", config, "--deep", timeout=120)
    # No datamover section and no policy attaching disks: this machine's SMBIOS UUID (or
    # no permission to read it) names no lab VM, which fails nothing.
    assert code == 0, out
    status, text = report(out)["engine lab: DataMover VM"]
    assert status == "skipped" and "not needed" in text, out
