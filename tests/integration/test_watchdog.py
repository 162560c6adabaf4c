"""The test run's watchdog (``tests/watchdog.py``) on a real pytest run with xdist workers.

A run with a test that hangs, and a helper process it started, under a short session limit:
the watchdog must name the test, show the worker's Python stack at the hanging line, kill the
helper, and end the run with its own exit status instead of waiting for CI's limit.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.watchdog import EXIT_STATUS, LIMIT_ENV, WARN_ENV

ROOT = Path(__file__).resolve().parents[2]

HANGING = """
import subprocess
import threading
from pathlib import Path


def test_quick():
    pass


def test_hangs_here(tmp_path):
    helper = subprocess.Popen(["sleep", "600"])
    Path({pidfile!r}).write_text(str(helper.pid))
    threading.Event().wait()  # the line the stacks must show: never set
"""


def test_a_hung_test_is_named_with_its_stack_and_the_run_ends(tmp_path: Path) -> None:
    pidfile = tmp_path / "helper.pid"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["tests.watchdog"]\n')
    (suite / "test_hang.py").write_text(textwrap.dedent(HANGING.format(pidfile=str(pidfile))))
    env = {**os.environ, LIMIT_ENV: "12", WARN_ENV: "4", "PYTHONPATH": str(ROOT)}
    env.pop("TESSERA_TEST_WATCH", None)  # this run's controller makes its own
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "1",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=0",
            "--rootdir",
            str(suite),
            str(suite),
        ],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_STATUS, out
    assert "watchdog: running for more than 4 s: test_hang.py::test_hangs_here" in out, out
    assert "watchdog: the test run passed its limit of 12 s" in out, out
    assert "Python stacks of worker gw0." in out, out
    assert 'test_hang.py", line 14 in test_hangs_here' in out, out
    assert "sleep 600" in out, out
    assert " MiB of " in out, out  # the free space  # the process tree names the helper
    helper = int(pidfile.read_text())
    assert not Path(f"/proc/{helper}").exists() or _is_zombie(helper), "the helper was left"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
