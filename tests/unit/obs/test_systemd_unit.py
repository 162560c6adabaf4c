"""systemd/tessera.service: the directives the daemon relies on, ExecStart is a command the
CLI parses, and ``systemd-analyze verify`` finds nothing wrong in it."""

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.main import build_parser
from engine.config.models import DEFAULT_SOCKET, DEFAULT_STATE_FILE

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "tessera.service"


def directives() -> dict[str, list[str]]:
    """``KEY`` → every value it has in [Service] (repeated keys such as DeviceAllow)."""
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith(("[", "#")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def test_sections_parse() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Unit"]["After"] == "network-online.target"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_service_directives() -> None:
    d = {key: values[-1] for key, values in directives().items()}
    assert d["Type"] == "notify"
    assert d["KillMode"] == "mixed"
    assert d["WatchdogSec"] == "60s"
    assert int(d["TimeoutStopSec"].rstrip("s")) > 300  # past the daemon's default --grace
    assert d["NoNewPrivileges"] == "yes"
    assert d["ProtectSystem"] == "strict"
    assert d["ProtectHome"] == "yes"
    assert d["PrivateTmp"] == "yes"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert d[key] == "yes"
    assert set(d["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert "PrivateDevices" not in d  # attached disks are read as /dev/sd*, /dev/vd*
    assert d["DevicePolicy"] == "closed"
    assert directives()["DeviceAllow"] == ["block-sd rw", "block-virtblk rw"]
    assert d["User"] == "tessera"  # packaging/tessera.sysusers creates it
    assert d["AmbientCapabilities"] == d["CapabilityBoundingSet"]


def test_writable_paths_match_the_config_defaults() -> None:
    d = {key: values[-1] for key, values in directives().items()}
    assert DEFAULT_SOCKET.parent == Path("/run") / d["RuntimeDirectory"]
    assert DEFAULT_STATE_FILE.parent == Path("/var/lib") / d["StateDirectory"]
    assert Path(d["ReadWritePaths"]) == DEFAULT_STATE_FILE.parent


def test_exec_start_is_a_command_the_cli_parses() -> None:
    argv = shlex.split(directives()["ExecStart"][-1])
    assert argv[0] == "/usr/bin/tessera"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.config == Path("/etc/tessera/config.yaml")


@pytest.mark.integration
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # systemd-analyze comes with Debian's systemd package; a machine without it (a bare
    # container) checks the unit through the tests above only.
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    unit = tmp_path / "tessera.service"
    tessera = Path(sys.executable).parent / "tessera"  # /usr/bin/tessera is not installed here
    assert tessera.exists()
    unit.write_text(UNIT.read_text().replace("/usr/bin/tessera", str(tessera)))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    # verify exits 0 even for unknown keys or bad values: the messages are the verdict.
    mentions = [line for line in done.stderr.splitlines() if "tessera.service" in line]
    assert done.returncode == 0, done.stderr
    assert mentions == []
