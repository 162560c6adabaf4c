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
  ``SESSION_LIMIT``), or no test has started or ended for ``TESSERA_TEST_STALL_LIMIT`` seconds
  (default ``STALL_LIMIT``: pytest-timeout ends any one test long before), prints the evidence,
  kills every process under the run and exits with status 3, so CI ends in minutes with the
  cause on screen;
* when an xdist worker dies (a crash: no report from the worker itself), prints the evidence
  at once, and names the dead worker in every later summary with how it ended: its exit
  status or signal (read from ``/proc`` while it is a zombie) and the head of the fatal error
  that ``faulthandler`` wrote for it (a segfault, an abort) with the Python line it was at.

The evidence: the tests running and for how long; the process tree under the run with each
process's state and kernel wait channel (and its kernel stack when it is in uninterruptible
sleep, the mark of a hung FUSE or block request); the FUSE mounts; the free space for
temporary files (a full disk makes servers hang in odd places); and every worker's Python
stacks, which each worker writes when sent ``SIGUSR1`` into a file under a directory the
controller makes (``TESSERA_TEST_WATCH``, inherited by workers): all threads
(``faulthandler``, from the signal handler), then what each asyncio task of the main thread
awaits, down its chain of awaits (a Python handler: an asyncio test that hangs shows only
its event loop waiting in the thread stacks). The same file takes a worker's fatal-signal
traceback.

Workers are restarted once after a crash (``--max-worker-restart=1`` in the Makefile): xdist
runs the crashed test again, and a second crash ends the run rather than hang it (with
``--dist loadfile`` xdist 3.8 can wait forever for a file whose test crashed twice). xdist
can still stall after a crash (seen in CI: the restarted worker got no test); the stall limit
ends such a run.

CI shows only the last lines of what a run printed, so every report ends with a summary of at
most ``SUMMARY_LINES`` lines: how far the run got (tests done of all, failed so far, seconds,
load average, free space), each test running with its seconds, each worker's process state
and kernel wait channel with the first processes under it (name, state, wait channel), where
each worker's tasks and threads were at the last look (its innermost frame in the project,
then the library call it waits in), the first failures with their one-line reasons and the
slowest tests done. The same summary is printed, once, when the free space for temporary
files falls below ``LOW_SPACE`` (``TESSERA_TEST_LOW_SPACE``), with the largest directories
under the run's base temporary directory.
"""

import asyncio
import contextlib
import faulthandler
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import IO, Final

import pytest

ENV: Final = "TESSERA_TEST_WATCH"  # the directory of the workers' stack files
LIMIT_ENV: Final = "TESSERA_TEST_SESSION_LIMIT"
WARN_ENV: Final = "TESSERA_TEST_WARN_AFTER"
LOW_SPACE_ENV: Final = "TESSERA_TEST_LOW_SPACE"
STALL_ENV: Final = "TESSERA_TEST_STALL_LIMIT"
POLL_ENV: Final = "TESSERA_TEST_WATCH_POLL"  # seconds between the thread's looks (tests)
WARN_AFTER: Final = 240.0  # pytest-timeout ends a worker at 300 s
# CI's limit is 90 min for everything (a new venv and packages included); make check takes
# 10-13 min there and here. Past an hour it is hung, or so slow that the evidence is the news.
SESSION_LIMIT: Final = 60 * 60.0
STALL_LIMIT: Final = 10 * 60.0  # no test started or ended: pytest-timeout ends one at 300 s
POLL: Final = 5.0
EXIT_WAIT: Final = 10.0  # seconds a dead worker gets to finish exiting before it is described
DUMP_WAIT: Final = 3.0  # at most, for the workers' faulthandler to write
EXIT_STATUS: Final = 3
LOW_SPACE: Final = 2 << 30  # bytes free for temporary files below which the run is reported
TASKS_HEADER: Final = "asyncio tasks of the main thread:"
TASKS_END: Final = "end of asyncio tasks"
SUMMARY_LINES: Final = 18  # CI shows the tail of the output: the summary fits in it

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
    stacks = (directory / f"{name}.{_process_key(os.getpid())}.stacks").open("a", encoding="utf-8")
    _stack_file.append(stacks)
    # The Python-level handler (asyncio's task chains) runs in the main thread once the
    # faulthandler one (every thread's frames, written from the signal handler) chained to it.
    signal.signal(signal.SIGUSR1, _write_tasks)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True, chain=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Fatal signals (SIGSEGV, SIGBUS, SIGABRT, ...) write their traceback into the stack file
    too, after pytest's own faulthandler plugin (configure) sent them to stderr: a worker's
    stderr is lost in CI's tail, the controller reads the file when the worker is reported
    down."""
    if _stack_file:
        faulthandler.enable(file=_stack_file[0], all_threads=True)


def _write_tasks(signum: int, frame: object) -> None:
    """Write what each asyncio task of the running loop awaits into the stack file.

    A hung asyncio test shows nothing in its thread stacks but the event loop waiting: the
    place is in the tasks' chains of awaits (``cr_await``), innermost last, which
    ``Task.get_stack`` does not follow."""
    lines = [TASKS_HEADER]
    try:
        for task in asyncio.all_tasks(asyncio.get_running_loop()):
            lines.append(f"Task {task.get_name()} (innermost last):")
            lines += [
                f'  File "{f.f_code.co_filename}", line {f.f_lineno} in {f.f_code.co_name}'
                for f in _await_chain(task.get_coro())
            ]
    except RuntimeError:
        lines.append("(no event loop running in the main thread)")
    except Exception as e:  # evidence only: never break the test it interrupted
        lines.append(f"(tasks not listed: {e!r})")
    lines.append(TASKS_END)
    with contextlib.suppress(OSError, ValueError):
        _stack_file[0].write("\n".join(lines) + "\n\n")
        _stack_file[0].flush()


def _await_chain(coro: object) -> list[types.FrameType]:
    """The frames of a coroutine and of what it awaits, down to the innermost, outermost first."""
    frames: list[types.FrameType] = []
    while coro is not None and len(frames) < 64:
        frame = next(
            (f for a in ("cr_frame", "gi_frame", "ag_frame") if (f := getattr(coro, a, None))),
            None,
        )
        if frame is not None:
            frames.append(frame)
        coro = next(
            (c for a in ("cr_await", "gi_yieldfrom", "ag_await") if (c := getattr(coro, a, None))),
            None,
        )
    return frames


def _process_key(pid: int) -> str:
    """``pid.starttime``: a stack file names its process, never a later one with the same pid."""
    return f"{pid}.{_stat(pid)[19]}"


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/pid/stat`` after the command name: state, ppid, ...

    OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class Watchdog:
    """The controller's side: tracks the run's tests; a daemon thread checks on them."""

    def __init__(self, config: pytest.Config, directory: Path) -> None:
        self.config = config
        self.directory = directory
        self.started = time.monotonic()
        self.limit = float(os.environ.get(LIMIT_ENV, SESSION_LIMIT))
        self.warn_after = float(os.environ.get(WARN_ENV, WARN_AFTER))
        self.running: dict[str, float] = {}  # node id → monotonic start
        self.reported: set[str] = set()
        self.collected = 0  # tests in the run, once collection is done (per worker with xdist)
        self.done = 0
        self.failures: list[str] = []  # "node id (phase): first line of the reason"
        self.slowest: list[tuple[float, str]] = []  # (seconds, node id), longest first
        self.low_space = int(os.environ.get(LOW_SPACE_ENV, LOW_SPACE))
        self.low_space_reported = False
        self.stall_limit = float(os.environ.get(STALL_ENV, STALL_LIMIT))
        self.poll = float(os.environ.get(POLL_ENV, POLL))
        self.last_event = self.started  # a test started or ended
        self.crashes: list[str] = []  # "gw0 (pid N) down: how it ended; the fatal error's head"
        self.lock = threading.Lock()
        self.offsets: dict[Path, int] = {}
        # worker name → where its tasks and threads were at the last look (``_places``)
        self.places: dict[str, list[str]] = {}
        self.stderr = os.dup(2)  # the real one: pytest's capture is suspended at configure
        threading.Thread(target=self._watch, name="tessera-watchdog", daemon=True).start()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.collected = max(self.collected, len(session.items))  # without xdist

    def pytest_xdist_node_collection_finished(self, node: object, ids: list[str]) -> None:
        self.collected = max(self.collected, len(ids))  # every worker collects the whole run

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        with self.lock:
            self.running[nodeid] = self.last_event = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            reason = _first_line(report)
            with self.lock:
                self.failures.append(f"{report.nodeid} ({report.when}): {reason}")
                if report.when == "???":  # xdist's report for a test whose worker died
                    self.running.pop(report.nodeid, None)

    def pytest_testnodedown(self, node: object, error: object | None) -> None:
        """An xdist worker is gone; with an error it died (SIGKILL, a segfault, os._exit)."""
        if not error:
            return
        name = getattr(getattr(node, "gateway", None), "id", "?")
        crash = f"{name} down ({error}): {_how_it_ended(self.directory, name)}"
        with self.lock:
            self.crashes.append(crash[:300])
        self._report(f"worker {name} died")

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        with self.lock:
            started = self.running.pop(nodeid, None)
            self.done += 1
            self.last_event = time.monotonic()
            if started is not None:
                self.slowest.append((time.monotonic() - started, nodeid))
                self.slowest = sorted(self.slowest, reverse=True)[:3]

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll)
            now = time.monotonic()
            with self.lock:
                late = [n for n, t in self.running.items() if now - t > self.warn_after]
                fresh = [n for n in late if n not in self.reported]
                self.reported.update(fresh)
                idle = now - self.last_event
                unfinished = not self.collected or self.done < self.collected
            if now - self.started > self.limit:
                self._report(f"the test run passed its limit of {self.limit:.0f} s")
                self._stop()
            if idle > self.stall_limit and unfinished:
                self._report(f"no test started or ended for {idle:.0f} s")
                self._stop()
            if fresh:
                self._report(f"running for more than {self.warn_after:.0f} s: {', '.join(fresh)}")
            if not self.low_space_reported and _free_space() < self.low_space:
                self.low_space_reported = True
                self._report(
                    f"less than {self.low_space >> 20} MiB free for temporary files",
                    space=True,
                )

    def _report(self, why: str, *, space: bool = False) -> None:
        """The evidence, then the summary (last, where CI's tail of the output shows it)."""
        lines = [f"watchdog: {why}"]
        lines += ["processes under the run:", *_process_tree(os.getpid())]
        lines += ["FUSE mounts:", *_fuse_mounts()]
        lines += self._stacks()
        summary = self._summary(why)
        if space:
            summary[2:2] = self._largest_temporary()
        self._write("\n".join(["", *lines, *summary[:SUMMARY_LINES], ""]))

    def _stacks(self) -> list[str]:
        asked = {}  # stack file → its size before the signal
        for pid in [*_descendants(os.getpid()), os.getpid()]:
            try:
                key = _process_key(pid)
            except (OSError, IndexError):
                continue
            for path in self.directory.glob(f"*.{key}.stacks"):
                asked[path] = path.stat().st_size
                os.kill(pid, signal.SIGUSR1)
        # Until every signalled process has written its threads (faulthandler, in the signal
        # handler) and its asyncio tasks (the Python handler, ending with TASKS_END), at most
        # DUMP_WAIT: a process stuck in the kernel or in C code holding the GIL may never.
        deadline = time.monotonic() + DUMP_WAIT
        while time.monotonic() < deadline and not all(
            TASKS_END in _tail_from(path, size) for path, size in asked.items()
        ):
            time.sleep(0.05)
        lines = []
        for path in sorted(self.directory.glob("*.stacks")):
            with path.open(encoding="utf-8", errors="replace") as f:
                f.seek(self.offsets.get(path, 0))
                text = f.read()
                self.offsets[path] = f.tell()
            if text:
                lines += [f"Python stacks of worker {path.stem}:", *text.splitlines()]
                places = _places(text, Path(self.config.rootpath))
                with self.lock:
                    self.places[path.stem.split(".")[0]] = places
        return lines

    def _summary(self, why: str) -> list[str]:
        now = time.monotonic()
        tmp = shutil.disk_usage(tempfile.gettempdir())
        with self.lock:
            running = sorted(self.running.items(), key=lambda item: item[1])
            failures, slowest = list(self.failures), list(self.slowest)
            crashes, reported = list(self.crashes), set(self.reported)
            done, collected = self.done, self.collected
        share = f" ({100 * done // collected} %)" if collected else ""
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        lines = [
            f"watchdog summary: {why}",
            f"  {done} of {collected or '?'} tests done{share} in {now - self.started:.0f} s,"
            f" {len(failures)} failed; load {load};"
            f" {tmp.free >> 20} MiB free of {tmp.total >> 20} MiB in {tempfile.gettempdir()}",
        ]
        lines += [f"  running {now - t:5.0f} s: {n}" for n, t in running]
        lines += [f"  worker {w}" for w in _workers(os.getpid())]
        with self.lock:
            places = {name: list(p) for name, p in self.places.items() if p}
        lines += [f"  {name} at: {' | '.join(p)}"[:400] for name, p in sorted(places.items())]
        lines += [f"  died: {c}" for c in crashes[:3]]
        late = sorted(reported - {n for n, _ in running})[:2]  # ran long, then ended or died
        lines += [f"  was late: {n} (past {self.warn_after:.0f} s; stacks above)" for n in late]
        lines += [f"  failed: {f}"[:300] for f in failures[:4]]
        if len(failures) > 4:
            lines.append(f"  ... and {len(failures) - 4} more failed")
        lines += [f"  slow, done: {s:5.0f} s {n}" for s, n in slowest]
        return lines

    def _largest_temporary(self) -> list[str]:
        """The largest directories two levels under the run's base temporary directory."""
        try:
            base = self.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        except Exception as e:  # evidence only: never break the report
            return [f"  (no base temporary directory: {e})"]
        sizes = [(_tree_size(d), d) for d in base.glob("*/*") if d.is_dir()]
        sizes += [
            (_tree_size(d), d)
            for d in base.glob("*")
            if d.is_dir() and not d.name.startswith("popen-")
        ]
        return [f"  {size >> 20:7d} MiB {d}" for size, d in sorted(sizes, reverse=True)[:4]]

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


def _places(text: str, root: Path) -> list[str]:
    """Where a worker's asyncio tasks and threads were, from what it wrote on SIGUSR1: for each
    with a frame of the project, its innermost such frame (``file:line function``), then the
    innermost frame of all when that is elsewhere (the library call it waits in). At most
    three, asyncio tasks first, the deepest first."""
    sections: list[tuple[bool, list[tuple[str, str, str]]]] = []  # (task?, frames innermost first)
    frame = re.compile(r'\s+File "(.*)", line (\d+) in (.*)')
    for line in text.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            sections.append((False, []))
        elif line.startswith("Task "):
            sections.append((True, []))
        elif sections and (m := frame.match(line)):
            task, frames = sections[-1]
            where = (m[1], m[2], m[3])
            frames.insert(0, where) if task else frames.append(where)  # tasks: outermost first

    def ours(path: str) -> bool:
        return path.startswith(str(root) + os.sep) and ".venv" not in path

    def name(path: str, line: str, function: str) -> str:
        shown = os.path.relpath(path, root) if ours(path) else os.path.basename(path)
        return f"{shown}:{line} {function}"

    found = []
    for _, frames in sorted(sections, key=lambda s: (not s[0], -len(s[1]))):
        mine = [f for f in frames if ours(f[0]) and not f[0].endswith("watchdog.py")]
        if not mine:
            continue
        place = name(*mine[0]) + ("" if frames[0] == mine[0] else f" → {name(*frames[0])}")
        if place not in found:
            found.append(place)
    return found[:3]


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return next((line for line in text.splitlines() if line.strip()), "?")


def _how_it_ended(directory: Path, name: str) -> str:
    """A dead worker's end: its exit status or signal while it is an unreaped zombie (field
    ``exit_code`` of ``/proc/pid/stat``), and the fatal error ``faulthandler`` wrote in its
    stack file: the error line and the innermost Python frame of the thread that took it."""
    parts = []
    for path in sorted(directory.glob(f"{name}.*.stacks")):
        pid = int(path.name.split(".")[1])
        _wait_exited(pid, EXIT_WAIT)
        try:
            fields = _stat(pid)
        except (OSError, IndexError):
            parts.append(f"pid {pid} reaped, its exit status unknown")
        else:
            if fields[0] == "Z":
                parts.append(f"pid {pid} {_wait_status(int(fields[49]))}")
            else:  # still exiting (xdist names a worker once: never an earlier one)
                parts.append(f"pid {pid} still there, state {fields[0]}")
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
        fatal = [i for i, line in enumerate(text) if line.startswith("Fatal Python error")]
        if fatal:
            after = text[fatal[-1] :]
            current = next((i for i, line in enumerate(after) if line.startswith("Current ")), 0)
            frames = [line.strip() for line in after[current:] if line.strip().startswith("File")]
            parts.append(after[0] + (f" at {frames[0]}" if frames else ""))
        else:
            parts.append("no fatal error written (SIGKILL, os._exit, or a killed process)")
    return "; ".join(parts) or "no stack file names it"


def _wait_exited(pid: int, timeout: float) -> None:
    """Wait until ``pid`` has exited (a zombie, or reaped), at most ``timeout`` seconds: xdist
    reports a worker down as soon as its pipe closes, while a SIGKILLed worker may still be
    tearing down (state R), which would hide its signal."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # reaped already
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)  # readable once every thread of it has exited
    finally:
        os.close(fd)


def _wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _free_space() -> int:
    return shutil.disk_usage(tempfile.gettempdir()).free


def _tree_size(root: Path) -> int:
    """Bytes allocated under root (sparse files count what they hold)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


def _workers(root: int) -> list[str]:
    """Each direct child of the run (the xdist workers): state, wait channel, processes under it."""
    tree = _children()
    lines = []
    for pid in tree.get(root, []):
        try:
            state = _stat(pid)[0]
            wchan = Path(f"/proc/{pid}/wchan").read_text() or "-"
        except (OSError, IndexError):
            continue
        under = _descendants(pid)
        stuck = [p for p in under if _state(p) == "D"]
        lines.append(
            f"pid {pid}: {state} in {wchan}; {len(under)} processes under it,"
            f" {len(stuck)} in uninterruptible sleep" + "".join(f"; {_brief(p)}" for p in under[:4])
        )
    return lines


def _brief(pid: int) -> str:
    """``name pid state wait-channel`` of a process, for the summary."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        wchan = Path(f"/proc/{pid}/wchan").read_text() or "-"
        return f"{name} {pid} {_stat(pid)[0]} {wchan}"
    except (OSError, IndexError):
        return f"{pid} gone"


def _state(pid: int) -> str:
    try:
        return _stat(pid)[0]
    except (OSError, IndexError):
        return "?"


def _tail_from(path: Path, offset: int) -> str:
    """What ``path`` holds past ``offset`` (all of it done when the file is gone)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return TASKS_END


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat(int(entry.name))[1])
        except (OSError, IndexError):
            continue
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
            if _state(pid) == "D":
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
