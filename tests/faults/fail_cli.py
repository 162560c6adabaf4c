"""Run ``tessera`` with a failpoint that raises an I/O error at its N-th hit.

python -m tests.faults.fail_cli POINT N KIND -- tessera-args...   (KIND: ENOSPC | EIO)
"""

import sys

from engine.cli.main import main
from engine.util import failpoints
from tests.faults.harness import Inject


def run() -> int:
    point, nth, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    args = sys.argv[sys.argv.index("--") + 1 :]
    failpoints.install(Inject(point, nth, kind))
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
