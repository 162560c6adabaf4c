"""Run ``tessera`` with a failpoint that SIGKILLs the process at its N-th hit.

python -m tests.integration.kill_backup POINT N -- tessera-args...
"""

import os
import signal
import sys

from engine.daemon.cli import main
from engine.util import failpoints


def run() -> int:
    point, nth = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    hits = 0

    def handler(name: str) -> None:
        nonlocal hits
        if name == point:
            hits += 1
            if hits == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    failpoints.install(handler)
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
