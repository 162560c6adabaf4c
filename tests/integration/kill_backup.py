"""Run ``tessera`` with a failpoint that SIGKILLs the process at its N-th hit.

python -m tests.integration.kill_backup POINT N -- tessera-args...
"""

import sys

from engine.cli.main import main
from engine.util import failpoints
from tests.helpers import sigkill_at


def run() -> int:
    point, nth = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1 :]
    failpoints.install(sigkill_at(point, nth))
    return main(args)


if __name__ == "__main__":
    sys.exit(run())
