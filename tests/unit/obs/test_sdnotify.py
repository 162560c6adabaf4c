"""sd_notify against a real unix datagram socket standing in for systemd (a path and an
abstract-namespace name), the watchdog interval from WATCHDOG_USEC/WATCHDOG_PID."""

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.daemon import sdnotify


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(10)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_messages_reach_the_socket(systemd: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = systemd
    assert sdnotify.ready("ready: 2 policies", environ=env)
    assert received(sock) == ["READY=1", "STATUS=ready: 2 policies", f"MAINPID={os.getpid()}"]
    assert sdnotify.status("opening stores\nstore main", environ=env)
    assert received(sock) == ["STATUS=opening stores store main"]
    assert sdnotify.watchdog(environ=env)
    assert received(sock) == ["WATCHDOG=1"]
    assert sdnotify.stopping(environ=env)
    assert received(sock) == ["STOPPING=1"]


def test_abstract_namespace() -> None:
    name = f"tessera-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sdnotify.ready(environ={"NOTIFY_SOCKET": "@" + name})
        assert received(sock)[0] == "READY=1"


def test_reads_os_environ_at_call_time(
    systemd: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = systemd
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert sdnotify.watchdog()
    assert received(sock) == ["WATCHDOG=1"]


def test_without_systemd_or_with_a_dead_socket_nothing_raises(tmp_path: Path) -> None:
    assert not sdnotify.ready(environ={})
    assert not sdnotify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sdnotify.status("x", environ={"NOTIFY_SOCKET": "vsock:2:1234"})


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": pid}) == 30.0
    assert (
        sdnotify.watchdog_interval(
            {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        )
        is None
    )
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sdnotify.watchdog_interval({}) is None
