"""Every numeric option of ``tessera`` is checked by argparse: a bad value is a usage error
(exit 2, naming the option) before anything runs; a good one arrives converted."""

import os
from datetime import timedelta
from pathlib import Path

import pytest

from engine.cli.commands.gc import options_from_args
from engine.cli.main import build_parser, main
from engine.config.types import Duration

# (command line before the option, option) for every numeric option of every command.
STORE = ["store", "init", "/nonexistent/s"]
BACKUP_IMAGE = ["backup", "image", "/nonexistent/i.qcow2", "--store", "/nonexistent/s"]
BACKUP_VM = ["backup", "vm", "vm1"]
GC = ["gc", "--store", "/nonexistent/s"]
PRUNE = ["prune", "--store", "/nonexistent/s"]
REPLICATE = ["replicate", "snap", "--store", "/nonexistent/s"]
ISSUE = ["peer", "issue", "--ca-dir", "ca", "--name", "a", "--out", "o"]
RESTORE = ["restore", "snap", "--store", "/nonexistent/s", "--to", "/nonexistent/d"]

BAD = [
    (RESTORE, "--disks-at-once", "0"),
    (RESTORE, "--disks-at-once", "all"),
    (BACKUP_IMAGE, "--readers", "0"),
    (BACKUP_IMAGE, "--readers", "-3"),
    (BACKUP_IMAGE, "--readers", "two"),
    (BACKUP_VM, "--readers", "0"),
    (BACKUP_VM, "--readers", "-1"),
    (STORE, "--chunk-size", "0"),
    (STORE, "--chunk-size", "3"),
    (STORE, "--chunk-size", "96k"),  # not a power of two
    (STORE, "--chunk-size", "32k"),  # below the format's minimum
    (STORE, "--chunk-size", "16M"),  # above its maximum
    (STORE, "--chunk-size", "-1M"),
    (STORE, "--pack-size", "0"),
    (STORE, "--pack-size", "64k"),
    (["store", "verify", "/nonexistent/s"], "--percent", "0"),
    (["store", "verify", "/nonexistent/s"], "--percent", "-5"),
    (["store", "verify", "/nonexistent/s"], "--percent", "101"),
    (["store", "verify", "/nonexistent/s"], "--percent", "nan"),
    (GC, "--repack-threshold", "-0.1"),
    (GC, "--repack-threshold", "2"),
    (GC, "--repack-threshold", "nan"),
    (GC, "--rate-limit", "0"),
    (GC, "--rate-limit", "-5"),
    (GC, "--rate-limit", "inf"),
    (GC, "--rate-limit", "0.5"),  # bytes per second: a whole number, as every size
    (GC, "--grace", "soon"),
    (GC, "--grace", "-1d"),
    (GC, "--grace", "1y"),  # the config has no years either
    (PRUNE, "--keep-last", "-1"),
    (PRUNE, "--keep-daily", "-2"),
    (PRUNE, "--keep-yearly", "x"),
    (["run"], "--grace", "-1"),
    (["run"], "--grace", "inf"),
    (["run"], "--grace", "nan"),
    (REPLICATE, "--streams", "0"),
    (REPLICATE, "--streams", "-4"),
    (REPLICATE, "--bwlimit", "0"),
    (REPLICATE, "--bwlimit", "-1M"),
    (ISSUE, "--port", "0"),
    (ISSUE, "--port", "65536"),
    (ISSUE, "--port", "-1"),
]


@pytest.mark.parametrize(("argv", "option", "value"), BAD, ids=lambda v: str(v))
def test_bad_value_is_a_usage_error(
    argv: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, f"{option}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err, err


GOOD = [
    (BACKUP_IMAGE, "--readers", "1", 1),
    (BACKUP_VM, "--readers", "8", 8),
    (STORE, "--chunk-size", "64k", 64 * 1024),
    (STORE, "--chunk-size", "8MiB", 8 * 1024 * 1024),
    (STORE, "--pack-size", "1M", 1024 * 1024),
    (["store", "verify", "/s"], "--percent", "10%", 10.0),
    (["store", "verify", "/s"], "--percent", "100", 100.0),
    (GC, "--repack-threshold", "0", 0.0),
    (GC, "--repack-threshold", "1", 1.0),
    (GC, "--rate-limit", "50MiB", 50 * 1024 * 1024),
    (PRUNE, "--keep-last", "0", 0),
    (["run"], "--grace", "0", 0.0),
    (REPLICATE, "--streams", "1", 1),
    (REPLICATE, "--bwlimit", "50MiB", 50 * 1024 * 1024),
    (ISSUE, "--port", "65535", 65535),
    (RESTORE, "--disks-at-once", "3", 3),
]


@pytest.mark.parametrize(("argv", "option", "value", "parsed"), GOOD, ids=lambda v: str(v))
def test_good_value_arrives_converted(
    argv: list[str], option: str, value: str, parsed: object
) -> None:
    args = build_parser().parse_args([*argv, option, value])
    assert getattr(args, option.lstrip("-").replace("-", "_")) == parsed


def test_gc_grace_zero_and_default_parse() -> None:
    assert build_parser().parse_args([*GC, "--grace", "0h"]).grace == timedelta(0)
    assert build_parser().parse_args([*GC, "--grace", "0"]).grace == timedelta(0)
    # left out: the daemon's gc_grace through the daemon, 7 days here (``options_from_args``)
    args = build_parser().parse_args(GC)
    assert args.grace is None
    assert options_from_args(args).grace == timedelta(days=7)


@pytest.mark.parametrize("text", ["1s", "90m", "12h", "2w", "1d12h", "7d"])
def test_gc_grace_is_written_as_the_configs(text: str) -> None:
    """What ``gc_grace:`` accepts, ``gc --grace`` accepts and means the same (issue 16:
    ``1s`` was refused, and ``m`` meant months here but minutes there)."""
    parsed = build_parser().parse_args([*GC, "--grace", text]).grace
    assert parsed == Duration(text).delta


def test_restore_to_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative --to names the file in the directory the command ran in, whatever the
    directory of the command that later finds it in the journal."""
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["restore", "s", "--store", "st", "--to", "out/d.qcow2"])
    assert args.to == tmp_path / "out" / "d.qcow2" and args.to.is_absolute()
    assert os.fspath(args.to) == os.path.join(os.getcwd(), "out", "d.qcow2")


def test_disks_at_once_is_for_local_images(capsys: pytest.CaptureFixture[str]) -> None:
    """Into the engine, the configuration's ``limits.restore_disks`` says it (the daemon
    runs such restores); the option is refused there rather than ignored."""
    code = main(["restore", "snap", "--config", "/nonexistent/c.yaml", "--disks-at-once", "3"])
    assert code == 2
    assert "--disks-at-once applies to --to PATH only" in capsys.readouterr().err
