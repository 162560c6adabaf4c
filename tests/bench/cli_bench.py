"""CLI start bench: how long ``tessera backup image --help`` takes, against the interpreter's
own start measured in the same run (issue 15: the command's start is part of every backup's
time; target ≤ 0.25 s on the CI machine).

- ``cli_start_backup_image_help_seconds``: the median wall time of ``RUNS`` runs of
  ``python -m engine.cli.main backup image --help`` (argument parsing and everything its
  modules import; nothing runs);
- ``python_start_seconds``: the median of ``python -c pass`` with the same interpreter;
- ``cli_start_vs_python_startup``: the first over the second;
- ``cli_start_backup_image_seconds``: the same for a real ``backup image`` up to its first
  check, of an image that does not exist (exit 2): the command's module and everything it
  imports (store, pipeline, logging, event loop) are loaded, nothing is opened.

One run of each first, not counted: it writes the bytecode caches.
"""

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = 7  # the median of 7 shrugs off a run slowed by another process on 2 cores

Report = Callable[[str, float, str], None]


def median_wall(argv: Sequence[str], runs: int = RUNS, exit_code: int = 0) -> float:
    """Median wall seconds of ``argv`` (it must exit with ``exit_code``), after one uncounted
    run."""
    walls = []
    for i in range(runs + 1):
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, check=False)
        if i:
            walls.append(time.perf_counter() - t)
        if proc.returncode != exit_code:
            raise RuntimeError(f"{argv}: exit {proc.returncode}: {proc.stderr.decode()}")
    return statistics.median(walls)


def run(report: Report) -> None:
    python = median_wall([sys.executable, "-c", "pass"])
    help_ = median_wall([sys.executable, "-m", "engine.cli.main", "backup", "image", "--help"])
    report("cli_start_backup_image_help_seconds", help_, "s")
    report("python_start_seconds", python, "s")
    report("cli_start_vs_python_startup", help_ / python, "x")
    missing = ["backup", "image", "/nonexistent/disk.raw", "--store", "/nonexistent/store"]
    start = median_wall([sys.executable, "-m", "engine.cli.main", *missing], exit_code=2)
    report("cli_start_backup_image_seconds", start, "s")
