"""The test run's watchdog: a hung test is named, with its stacks, long before CI's limit.

CI gives ``make check`` a fixed time and, past it, ends the run without a word of why. A test
that hangs where pytest-timeout cannot reach it (in a fixture at session end, in a process
that cannot exit, in the controller itself), or a worker that dies without a report, would
leave only a row of dots. So this plugin, in the process that drives the run (the xdist
controller, or the only process without xdist), keeps a thread that:

* names every test still running ``WARN_AFTER`` seconds (``TESSERA_TEST_WARN_AFTER``) after
  it started, before pytest-timeout's limit ends its worker, and prints the evidence (below)
  once per test;
* when the whole run passes ``TESSERA_TEST_SESSION_LIMIT`` seconds (default
  ``SESSION_LIMIT``), prints the evidence, kills every process under the run and exits with
  status 3, so CI ends in minutes with the cause on screen.

The evidence: the tests running and for how long; the process tree under the run with each
process's state and kernel wait channel (and its kernel stack when it is in uninterruptible
sleep, the mark of a hung FUSE or block request); the FUSE mounts; the free space for
temporary files (a full disk makes servers hang in odd places); and every worker's Python
stacks, all threads, which each worker writes when sent ``SIGUSR1`` (``faulthandler``) into a
file under a directory the controller makes (``TESSERA_TEST_WATCH``, inherited by workers).
"""

import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Final

import pytest

ENV: Final = "TESSERA_TEST_WATCH"  # the directory of the workers' stack files
LIMIT_ENV: Final = "TESSERA_TEST_SESSION_LIMIT"
WARN_ENV: Final = "TESSERA_TEST_WARN_AFTER"
WARN_AFTER: Final = 240.0  # pytest-timeout ends a worker at 300 s
SESSION_LIMIT: Final = 40 * 60.0  # CI's limit is 90 min for everything; make check takes ~15
POLL: Final = 5.0
DUMP_WAIT: Final = 3.0  # at most, for the workers' faulthandler to write
EXIT_STATUS: Final = 3

_stack_file: list[IO[str]] = []  # a worker's open stack file (kept open for faulthandler)


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _is_worker(config):
        if ENV not in os.environ:
            os.environ[ENV] = tempfile.mkdtemp(prefix="tessera-test-watch-")
            config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(ENV), ignore_errors=True))
        watch = Watchdog(config, Path(os.environ[ENV]))
        config.pluginmanager.register(watch, "tessera-watchdog")
    directory = Path(os.environ[ENV])
    name = config.workerinput["workerid"] if _is_worker(config) else "main"  # type: ignore[attr-defined]
    stacks = (directory / f"{name}.{os.getpid()}.stacks").open("a", encoding="utf-8")
    _stack_file.append(stacks)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)


class Watchdog:
    """The controller's side: tracks running tests; a daemon thread checks them."""

    def __init__(self, config: pytest.Config, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.started = time.monotonic()
        self.limit = float(os.environ.get(LIMIT_ENV, SESSION_LIMIT))
        self.warn_after = float(os.environ.get(WARN_ENV, WARN_AFTER))
        self.running: dict[str, float] = {}  # node id → monotonic start
        self.reported: set[str] = set()
        self.lock = threading.Lock()
        self.offsets: dict[Path, int] = {}
        self.stderr = os.dup(2)  # the real one: pytest's capture is suspended at configure
        threading.Thread(target=self._watch, name="tessera-watchdog", daemon=True).start()

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        with self.lock:
            self.running[nodeid] = time.monotonic()

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        with self.lock:
            self.running.pop(nodeid, None)

    def _watch(self) -> None:
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            with self.lock:
                late = [n for n, t in self.running.items() if now - t > self.warn_after]
                fresh = [n for n in late if n not in self.reported]
                self.reported.update(fresh)
            if now - self.started > self.limit:
                self._report(f"the test run passed its limit of {self.limit:.0f} s")
                self._stop()
            if fresh:
                self._report(f"running for more than {self.warn_after:.0f} s: {', '.join(fresh)}")

    def _report(self, why: str) -> None:
        lines = [f"watchdog: {why}", "tests running:"]
        now = time.monotonic()
        with self.lock:
            lines += [f"  {now - t:7.0f} s  {n}" for n, t in sorted(self.running.items())]
        lines += ["processes under the run:", *_process_tree(os.getpid())]
        lines += ["FUSE mounts:", *_fuse_mounts()]
        tmp = shutil.disk_usage(tempfile.gettempdir())
        lines += [f"free in {tempfile.gettempdir()}: {tmp.free >> 20} MiB of {tmp.total >> 20} MiB"]
        asked = {}  # stack file → its size before the signal
        for pid in [*_descendants(os.getpid()), os.getpid()]:
            for path in self.directory.glob(f"*.{pid}.stacks"):
                asked[path] = path.stat().st_size
                os.kill(pid, signal.SIGUSR1)
        # Until every signalled process has written (faulthandler writes in its signal
        # handler), at most DUMP_WAIT: a process stuck in the kernel may never run it.
        deadline = time.monotonic() + DUMP_WAIT
        while time.monotonic() < deadline and any(
            _size(path) <= size for path, size in asked.items()
        ):
            time.sleep(0.05)
        for path in sorted(self.directory.glob("*.stacks")):
            with path.open(encoding="utf-8", errors="replace") as f:
                f.seek(self.offsets.get(path, 0))
                text = f.read()
                self.offsets[path] = f.tell()
            if text:
                lines += [f"Python stacks of worker {path.stem}:", *text.splitlines()]
        self._write("\n".join(["", *lines, ""]))

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(self.stderr, data) :]

    def _stop(self) -> None:
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._write(f"watchdog: stopped the run (exit status {EXIT_STATUS})\n")
        os._exit(EXIT_STATUS)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 1 << 62  # gone: nothing more to wait for


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(root: int) -> list[int]:
    tree, found, todo = _children(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _process_tree(root: int) -> list[str]:
    pids = [root, *_descendants(root)]
    out = subprocess.run(
        [
            "ps",
            "--forest",
            "-o",
            "pid,ppid,stat,etimes,wchan:24,args",
            "-p",
            ",".join(map(str, pids)),
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    lines = [f"  {line[:300]}" for line in out]
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "D":
                stack = Path(f"/proc/{pid}/stack").read_text().splitlines()
                lines += [
                    f"  kernel stack of {pid} (uninterruptible):",
                    *(f"    {s}" for s in stack),
                ]
        except OSError:
            continue
    return lines


def _fuse_mounts() -> list[str]:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    return [f"  {m}" for m in mounts if len(m.split()) > 2 and "fuse" in m.split()[2]]
