"""A local command loads no HTTP or oVirt code: ``tessera backup image`` and ``restore`` of
local images run with neither aiohttp nor the oVirt SDK imported (issue 15: the command's
start is part of every backup's time). ``--help`` loads no command's machinery at all, and
no command loads rich unless it draws progress bars on a terminal. The modules are read from
the command's own process when it exits, after the whole command ran.

How long the start takes is measured by ``python -m tests.bench cli``, not here."""

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
# structlog's console renderer would format tracebacks with rich (and rich highlights with
# pygments): ~50 ms at every start, for a traceback the CLI prints plainly anyway. Progress
# bars use rich on a terminal only; these commands run with their output captured.
NO_COMMAND = ("rich", "pygments")
# A local backup or restore is given no configuration (its models, loader and YAML load only
# with one), and the registry reads the plugins' entry points itself (importlib.metadata
# imports email, zipfile and csv).
NOT_READ = ("engine.config", "yaml", "importlib.metadata")
# What the commands that go through the engine or a daemon run, and what only the daemon
# does (forward its log to syslog).
THROUGH_ENGINE = ("engine.cli.commands.vm", "engine.cli.commands.service")
DAEMON_ONLY = ("engine.daemon", "engine.obs.syslog")
# Parsing arguments needs the parser, not what the commands run.
NOT_FOR_HELP = (
    *NOT_LOCAL,
    *NO_COMMAND,
    "structlog",
    "asyncio",
    "uvloop",
    "msgspec",
    "yaml",
    "cryptography",
    "blake3",
    "zstandard",
    "importlib.metadata",
    "engine.cli.commands.",  # the package itself (``Handler``) is the parser's
    "engine.app.backup",
    "engine.store.chunk_store",
    "engine.sources",
    "engine.config",
    "engine.obs",
    "plugins",
)


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


def among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The ``modules`` that are one of ``names`` or inside one (a name ending in a dot: only
    inside it)."""
    return sorted(
        m
        for m in modules
        if any(
            m.startswith(n) if n.endswith(".") else m == n or m.startswith(f"{n}.") for n in names
        )
    )


def loaded(modules: set[str]) -> list[str]:
    """The modules a local command should not have loaded."""
    return among(
        modules,
        (*NOT_LOCAL, *OTHER_PLUGINS, *NO_COMMAND, *NOT_READ, *THROUGH_ENGINE, *DAEMON_ONLY),
    )


def test_help_loads_no_command() -> None:
    for command in (["backup", "image"], ["restore"], ["gc"], []):
        assert among(modules_of(*command, "--help"), NOT_FOR_HELP) == [], command


def test_a_local_backup_and_restore_load_only_what_they_use(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(256 * 1024) + bytes(768 * 1024))
    store = tmp_path / "store"
    assert loaded(modules_of("store", "init", store, "--chunk-size", "64k")) == []
    backup = modules_of("backup", "image", image, "--store", store)
    assert loaded(backup) == []
    assert among(backup, ("engine.app.restore", "engine.restore", "engine.app.maintenance")) == []
    listing = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "snapshots", "--store", str(store), "--json"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV}, check=True,
    )  # fmt: skip
    (snapshot,) = json.loads(listing.stdout)
    out = tmp_path / "out.raw"
    restore = modules_of("restore", snapshot["id"], "--store", store, "--to", out)
    assert loaded(restore) == []
    assert (
        among(restore, ("engine.app.backup", "engine.pipeline.disk", "engine.cli.commands.backup"))
        == []
    )
