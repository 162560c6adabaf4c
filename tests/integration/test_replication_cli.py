"""The command line end to end: ``peer init-ca``, ``peer issue``, ``peer init-store``,
``peer serve`` (a subprocess, stopped with SIGTERM) and ``replicate``; the replica verifies
clean and restores the same bytes."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from tests.cli import Cli
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE.decode()}
CLI = Cli(passphrase=PASSPHRASE.decode(), timeout=120)
tessera = CLI.ok


def test_peer_commands_and_replicate(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    tessera("peer", "init-ca", "--dir", ca)
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    out = tessera(
        "peer", "issue", "--ca-dir", ca, "--name", "site-b", "--out", tmp_path / "b",
        "--ip", "127.0.0.1", "--port", "9444",
    )  # fmt: skip
    assert "url: https://127.0.0.1:9444" in out
    assert "tessera peer serve" in out
    tessera("peer", "issue", "--ca-dir", ca, "--name", "site-a", "--out", tmp_path / "a")

    origin_path = tmp_path / "origin"
    Store.init(origin_path, chunk_size=64 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    data = realistic_bytes(30 * 64 * 1024, seed=3)
    with Store.open(origin_path, passphrase=PASSPHRASE) as origin:
        m = write_snapshot(origin, "web01", {"root": data})
    replica_path = tmp_path / "replica"
    tessera("peer", "init-store", replica_path, "--from-store", origin_path)

    b = tmp_path / "b"
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli.main",
            "peer",
            "serve",
            "--store",
            replica_path,
            "--listen",
            "127.0.0.1:0",
            "--cert",
            b / "site-b.crt",
            "--key",
            b / "site-b.key",
            "--ca",
            b / "ca.crt",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        port = re.search(r"https://127\.0\.0\.1:(\d+)", line)
        assert port, line + (serve.stderr.read() if serve.stderr else "")
        a = tmp_path / "a"
        out = tessera(
            "replicate", "--vm", "web01", "--store", origin_path,
            "--peer-url", f"https://127.0.0.1:{port.group(1)}", "--peer", "site-b",
            "--cert", a / "site-a.crt", "--key", a / "site-a.key", "--ca", a / "ca.crt",
            "--streams", "2", "--bwlimit", "1GiB",
        )  # fmt: skip
        assert f"snapshot {m.snapshot_id} → site-b (full)" in out
        assert "succeeded" in out
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
    assert serve.returncode == 0
    assert (origin_path / "replication" / "site-b.json").exists()
    assert "ok" in tessera("store", "verify", replica_path, "--data")
    with Store.open(replica_path, passphrase=PASSPHRASE, writable=False) as replica:
        assert read_disk(replica, replica.manifest(m.snapshot_id)) == data
