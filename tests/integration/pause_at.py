"""Run ``tessera`` with a failpoint that holds the process at the first hit of a point.

python -m tests.integration.pause_at POINT DIR -- tessera-args...

At the first hit of ``POINT`` the thread that hit it binds ``DIR/held.sock`` (a unix datagram
socket), tells the test so with a datagram to ``DIR/test.sock`` (the test's, bound before it
started this process), and waits (at most ``HOLD``) for a datagram back: a test can act while
a job is surely mid-way (e.g. interrupt a client following it), then let it go on. No file is
polled: each side waits for the other's message. A hit on the event loop holds the whole
process, its API too.
"""

import contextlib
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from engine.cli.main import main
from engine.util import failpoints

HOLD: Final = 120.0


def pause_at(point: str, directory: Path) -> Callable[[str], None]:
    first = threading.Event()

    def handler(name: str) -> None:
        if name != point or first.is_set():
            return
        first.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as held:
            held.bind(str(directory / "held.sock"))
            held.settimeout(HOLD)
            held.sendto(b"paused", str(directory / "test.sock"))
            with contextlib.suppress(TimeoutError):
                held.recv(16)  # the test's "go on"

    return handler


def run() -> int:
    point, directory = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    failpoints.install(pause_at(point, directory))
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
