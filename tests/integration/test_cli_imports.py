"""A local command loads no HTTP or oVirt code: ``tessera backup image`` and ``restore`` of
local images run with neither aiohttp nor the oVirt SDK imported (issue 15: the command's
start is part of every backup's time). The modules are read from the command's own process
when it exits, after the whole command ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {"TESSERA_PASSPHRASE": "test-pass"}
# Runs the command as ``tessera`` does, then prints the modules it loaded (to stderr's last
# line, whatever the command printed).
RUNNER = """
import json, sys
from engine.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(code)
"""
NOT_LOCAL = ("aiohttp", "ovirtsdk4", "engine.api", "engine.replication")
# The registry reads every plugin's ``Plugin`` (its package, light by design); nothing below.
OTHER_PLUGINS = ("plugins.ovirt.", "plugins.lab.")


def modules_of(*args: str | Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


def loaded(modules: set[str]) -> list[str]:
    """The modules a local command should not have loaded."""
    return sorted(
        m
        for m in modules
        if m.split(".")[0] in NOT_LOCAL
        or m.startswith(tuple(f"{n}." for n in NOT_LOCAL))
        or m in NOT_LOCAL
        or m.startswith(OTHER_PLUGINS)
    )


def test_a_local_backup_and_restore_load_no_http_or_ovirt_code(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(256 * 1024) + bytes(768 * 1024))
    store = tmp_path / "store"
    assert loaded(modules_of("store", "init", store, "--chunk-size", "64k")) == []
    assert loaded(modules_of("backup", "image", image, "--store", store)) == []
    listing = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "snapshots", "--store", str(store), "--json"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV}, check=True,
    )  # fmt: skip
    (snapshot,) = json.loads(listing.stdout)
    out = tmp_path / "out.raw"
    assert loaded(modules_of("restore", snapshot["id"], "--store", store, "--to", out)) == []
