"""``tessera store`` end to end, as an operator runs it (subprocess, real files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from tests.cli import Cli
from tests.helpers import realistic_bytes, write_snapshot

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLI = Cli(timeout=120)
tessera = CLI.run


def no_passphrase(*args: str) -> subprocess.CompletedProcess[str]:
    """``tessera ARGS`` with no passphrase to be had: none in the environment, no terminal."""
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_init_info_rebuild_verify(tmp_path: Path) -> None:
    store, pw = tmp_path / "s", tmp_path / "pw"
    pw.write_text("hunter2\n")
    proc = tessera(
        "store",
        "init",
        str(store),
        "--chunk-size",
        "64k",
        "--pack-size",
        "1M",
        "--passphrase-file",
        str(pw),
    )
    assert proc.returncode == 0, proc.stderr
    assert "chunk size 64.0 KiB" in proc.stdout
    with Store.open(store, passphrase=b"hunter2") as s:
        disk = realistic_bytes(40 * 65536, seed=11)
        write_snapshot(s, "vm1", {"d": disk})
        write_snapshot(s, "vm2", {"d": disk})
    env = {"TESSERA_PASSPHRASE": "hunter2"}
    info = json.loads(tessera("store", "info", str(store), "--json", env=env).stdout)
    assert info["chunk_size"] == 65536 and info["snapshots"] == 2
    assert info["dedup_ratio"] == pytest.approx(2.0, rel=0.02)
    assert info["compression_ratio"] > 1.5
    assert info["packs"] >= 1 and info["chunks"] > 0
    assert info["stored_bytes"] < info["unique_bytes"] <= info["logical_bytes"]
    human = tessera("store", "info", str(store), env=env).stdout
    assert "dedup ratio  2.00" in human
    # no passphrase needed: nothing info shows is secret (issue 16)
    keyless = no_passphrase("store", "info", str(store), "--json")
    assert keyless.returncode == 0, keyless.stderr
    assert json.loads(keyless.stdout) == info
    assert "chunk size   64.0 KiB" in no_passphrase("store", "info", str(store)).stdout
    (store / "index.db").unlink()
    # a missing index is counted from the packs: that takes the key
    assert no_passphrase("store", "info", str(store)).returncode != 0
    assert tessera("store", "info", str(store), env=env).returncode == 0
    proc = tessera("store", "rebuild-index", str(store), env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"{info['chunks']} chunks" in proc.stdout
    assert tessera("store", "verify", str(store), "--data", env=env).returncode == 0


def test_external_key_file_and_unencrypted(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "offsite.key"
    env = {"TESSERA_PASSPHRASE": "pw"}
    assert (
        tessera("store", "init", str(tmp_path / "a"), "--key-file", str(key), env=env).returncode
        == 0
    )
    assert key.exists() and not (tmp_path / "a" / "keys" / "key").exists()
    proc = tessera("snapshots", "--store", str(tmp_path / "a"), env=env)
    assert proc.returncode == 2 and "key file" in proc.stderr and "does not exist" in proc.stderr
    proc = tessera("snapshots", "--store", str(tmp_path / "a"), "--key-file", str(key), env=env)
    assert proc.returncode == 0, proc.stderr
    assert tessera("store", "info", str(tmp_path / "a")).returncode == 0  # needs no key
    proc = tessera("store", "init", str(tmp_path / "b"), "--encryption", "none")
    assert proc.returncode == 0, proc.stderr
    assert tessera("store", "info", str(tmp_path / "b")).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chunk-size", "100k"], "must be a power of two"),
        (["--chunk-size", "lots"], "not a size: 'lots'"),
        (["--encryption", "rot13"], "invalid choice"),
    ],
)
def test_init_rejects_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    proc = tessera("store", "init", str(tmp_path / "s"), *args, env={"TESSERA_PASSPHRASE": "x"})
    assert proc.returncode != 0
    assert message in proc.stderr


def test_no_passphrase_without_terminal(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_PASSPHRASE"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "store", "init", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 2
    assert "--passphrase-file" in proc.stderr and "TESSERA_PASSPHRASE" in proc.stderr
    assert not (tmp_path / "s").exists()
