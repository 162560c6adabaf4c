"""``tessera`` in pipes and scripts (issue 16, point 6): run as a script runs it, in a
process of its own, its standard output a pipe."""

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from engine.cli.exits import EXIT_PIPE
from tests.cli import Cli

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLI = Cli(passphrase="test-pass")
tessera = CLI.run
ok = CLI.ok


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "store"
    ok("store", "init", path, "--chunk-size", "64k", "--pack-size", "1M")
    return path


def closed_pipe(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``tessera ARGS`` writing into a pipe whose reader has already left (``| head -0``,
    deterministically: the read end is closed before the command starts)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return tessera(*args, stdout=write)
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "argv",
    [
        ["snapshots", "--store", "STORE"],
        ["snapshots", "--store", "STORE", "--json"],
        ["prune", "--store", "STORE", "--keep-last", "1", "--json"],
        ["prune", "--store", "STORE", "--keep-last", "1", "--dry-run"],
    ],
    ids=" ".join,
)
def test_a_reader_that_leaves_ends_the_command_quietly(store: Path, argv: list[str]) -> None:
    """Exit 141 as a shell reports SIGPIPE, nothing on stderr: no traceback, no "Broken
    pipe" error naming the store (``--help`` is left out: argparse ignores its own write
    errors and exits 0)."""
    proc = closed_pipe(*[store if a == "STORE" else a for a in argv])
    assert proc.returncode == EXIT_PIPE, proc.stderr
    assert proc.stderr == ""


def test_version() -> None:
    """``tessera --version`` names the installed distribution's version (pyproject's)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    out = ok("--version")
    assert out.startswith(f"tessera {version} (Python "), out
