"""A minimal ``sd_notify(3)`` client, without python-systemd.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace) to a
``Type=notify`` service; the service sends newline-separated ``KEY=VALUE`` datagrams to it::

    tessera run ──"READY=1\\nSTATUS=ready: 3 policies"──▶ NOTIFY_SOCKET (AF_UNIX, DGRAM)
                ──"WATCHDOG=1"  every watchdog_interval() seconds (half of WatchdogSec)──▶
                ──"STOPPING=1"──▶

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op returning False. The
environment is read at each call, never at import time; ``environ`` overrides it (tests).
Sending never blocks (a full receiver queue drops the datagram) and never raises: a failure
is logged and returned as False, so a missing socket cannot stop the daemon.
"""

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("tessera.sdnotify")


def _address(environ: Mapping[str, str]) -> str | None:
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace
    if path.startswith("/"):
        return path
    if path:
        log.warning("sdnotify.unsupported_socket", socket=path)  # e.g. vsock: addresses
    return None


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` assignments in one datagram; True if systemd got it."""
    address = _address(os.environ if environ is None else environ)
    if address is None:
        return False
    data = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(data, address)
    except OSError as exc:
        log.warning("sdnotify.failed", message=assignments[0] if assignments else "", error=exc)
        return False
    return True


def ready(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Startup is finished: systemd considers the unit started (``READY=1``)."""
    extra = [f"STATUS={_one_line(status_text)}"] if status_text is not None else []
    return notify("READY=1", *extra, f"MAINPID={os.getpid()}", environ=environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun (``STOPPING=1``); systemd then waits up to ``TimeoutStopSec``."""
    return notify("STOPPING=1", environ=environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """A one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """Keep-alive ping (``WATCHDOG=1``); send one every ``watchdog_interval()`` seconds."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())
