"""Run ``tessera`` with a failpoint that holds the process at the first hit of a point.

python -m tests.integration.pause_at POINT DIR -- tessera-args...

At the first hit of ``POINT`` the thread that hit it writes ``DIR/paused`` and waits (at most
``HOLD``) until ``DIR/resume`` exists: a test can act while a job is surely mid-way (e.g.
interrupt a client following it), then let it go on. A hit on the event loop holds the whole
process, its API too.
"""

import sys
import threading
import time
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
        (directory / "paused").touch()
        deadline = time.monotonic() + HOLD
        while not (directory / "resume").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    return handler


def run() -> int:
    point, directory = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    failpoints.install(pause_at(point, directory))
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
