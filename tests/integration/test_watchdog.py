"""The test run's watchdog (``tests/watchdog.py``) on a real pytest run with xdist workers.

A run with a test that hangs, and a helper process it started, under a short session limit:
the watchdog must name the test, show the worker's Python stack at the hanging line, kill the
helper, and end the run with its own exit status instead of waiting for CI's limit. CI shows
only the tail of the output, so the last lines must be the summary: progress, the failure so
far with its reason, the running test, the worker's state, the low-space alarm. A worker that
dies is named with how it ended (the signal, the fatal error and its line); a run where no
test starts or ends for too long is stopped.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.watchdog import (
    EXIT_STATUS,
    LIMIT_ENV,
    LOW_SPACE_ENV,
    POLL_ENV,
    STALL_ENV,
    SUMMARY_LINES,
    WARN_ENV,
)

ROOT = Path(__file__).resolve().parents[2]

HANGING = """
import subprocess
import threading
from pathlib import Path


def test_quick():
    pass


def test_fails():
    assert 1 + 1 == 3, "arithmetic is broken"


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
    env = {
        **os.environ,
        LIMIT_ENV: "12",
        WARN_ENV: "4",
        LOW_SPACE_ENV: str(1 << 62),  # every disk is "low": the alarm must fire once
        "PYTHONPATH": str(ROOT),
    }
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
    assert 'test_hang.py", line 18 in test_hangs_here' in out, out
    assert "sleep 600" in out, out  # the process tree names the helper
    assert out.count("watchdog summary: less than ") == 1, out  # once, with the largest dirs
    # The tail: the last report's summary, then the stop.
    tail = proc.stderr.rstrip().splitlines()[-(SUMMARY_LINES + 2) :]
    start = next(i for i, line in enumerate(tail) if line.startswith("watchdog summary: "))
    summary = "\n".join(tail[start:])
    assert tail[start] == "watchdog summary: the test run passed its limit of 12 s", summary
    assert "  2 of 3 tests done (66 %) in " in summary, summary
    assert " 1 failed; load " in summary and " MiB free of " in summary, summary
    assert re.search(r"running +\d+ s: test_hang.py::test_hangs_here", summary), summary
    assert re.search(r"worker pid \d+: S in \S+; 1 processes under it, 0 in", summary), summary
    assert "failed: test_hang.py::test_fails (call): AssertionError: arithmetic is broken" in (
        summary
    ), summary
    assert tail[-1] == f"watchdog: stopped the run (exit status {EXIT_STATUS})", summary
    helper = int(pidfile.read_text())
    assert not Path(f"/proc/{helper}").exists() or _is_zombie(helper), "the helper was left"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


CRASHING = """
import faulthandler
import os
import signal


def test_quick():
    pass


def test_segfaults():
    faulthandler._sigsegv()  # the line the summary must name


def test_is_killed():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_suite(tmp_path: Path, source: str, env: dict[str, str], *args: str) -> str:
    """Run ``source`` as a test file under pytest with xdist and the watchdog; its output."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text('pytest_plugins = ["tests.watchdog"]\n')
    (suite / "test_it.py").write_text(textwrap.dedent(source))
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    full_env.pop("TESSERA_TEST_WATCH", None)  # this run's controller makes its own
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "timeout=0"]
    proc = subprocess.run(
        [*command, "--rootdir", str(suite), *args, str(suite)],
        cwd=suite,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return f"exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_a_dead_worker_is_named_with_its_signal_and_the_line_it_died_at(tmp_path: Path) -> None:
    out = run_suite(tmp_path, CRASHING, {}, "-n", "1", "--max-worker-restart=2")
    assert out.startswith("exit status 1\n"), out
    assert "watchdog: worker gw0 died" in out, out
    died = re.findall(r"^  died: .*$", out, re.MULTILINE)
    segfault = re.compile(
        r"  died: gw0 down \(Not properly terminated\): pid \d+"
        r" (killed by SIGSEGV|reaped, its exit status unknown);"
        r" Fatal Python error: Segmentation fault at File \".*test_it.py\", line 12 in"
        r" test_segfaults$"
    )
    assert any(segfault.match(line) for line in died), out
    killed = re.compile(
        r"  died: gw1 down \(Not properly terminated\): pid \d+"
        r" (killed by SIGKILL|reaped, its exit status unknown);"
        r" no fatal error written"
    )
    assert any(killed.match(line) for line in died), out
    assert "crashed while running 'test_it.py::test_is_killed'" in out, out


def test_a_run_where_no_test_starts_or_ends_is_stopped(tmp_path: Path) -> None:
    source = """
import threading
import time


def test_slow():
    time.sleep(4)  # late, then done: named in the summary


def test_waits():
    threading.Event().wait()
"""
    # the watchdog looks every 0.2 s: it sees test_slow running past WARN, whatever the load
    env = {STALL_ENV: "8", LIMIT_ENV: "200", WARN_ENV: "2", POLL_ENV: "0.2"}
    out = run_suite(tmp_path, source, env, "-n", "1")
    assert out.startswith(f"exit status {EXIT_STATUS}\n"), out
    summary = out[out.rindex("watchdog summary: ") :]
    assert re.match(r"watchdog summary: no test started or ended for \d+ s", summary), out
    assert re.search(r"running +\d+ s: test_it.py::test_waits", summary), out
    assert "  was late: test_it.py::test_slow (past 2 s; stacks above)" in summary, out


def test_a_hung_asyncio_test_is_named_where_it_awaits(tmp_path: Path) -> None:
    source = """
import asyncio


async def wait_for_the_device(proc):
    await proc.wait()  # the line the summary must name


async def test_hangs_in_a_coroutine():
    proc = await asyncio.create_subprocess_exec("sleep", "600")
    await wait_for_the_device(proc)
"""
    env = {STALL_ENV: "200", LIMIT_ENV: "10", WARN_ENV: "3", POLL_ENV: "0.2"}
    out = run_suite(tmp_path, source, env, "-n", "1", "-o", "asyncio_mode=auto")
    assert out.startswith(f"exit status {EXIT_STATUS}\n"), out
    # the evidence: the task's chain of awaits, innermost last
    assert "asyncio tasks of the main thread:" in out, out
    assert re.search(r'test_it.py", line 6 in wait_for_the_device\n  File ".*', out), out
    summary = out[out.rindex("watchdog summary: ") :]
    # the summary: where the worker waits (our line, then the library's), and its helper
    assert re.search(
        r"^  gw0 at: test_it.py:6 wait_for_the_device → \w+\.py:\d+ \w+", summary, re.MULTILINE
    ), out
    assert re.search(r"1 processes under it, 0 in uninterruptible sleep; sleep \d+ S ", summary), (
        out
    )
