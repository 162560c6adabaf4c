"""qemu-img and qemu-nbd as asyncio subprocesses.

``qemu_img(*args)`` runs one qemu-img command and returns its stdout; ``create``, ``info``,
``bitmap_add``, ``bitmap_remove`` and ``bitmaps`` are the commands Tessera needs. A failing
command raises ``QemuError`` naming the command line and quoting its stderr; a cancelled one
is killed and reaped.

``QemuNbd`` serves one image over a unix socket in a private temporary directory (the
lifecycle is ``NbdServerProcess``'s, which can run any NBD server)::

    async with QemuNbd(path, "qcow2", read_only=True, bitmap="b1") as server:
        async with await connect(server.address, meta_contexts=server.meta_contexts) as c:
            ...

``prepare()`` makes the private directory (``tessera-nbd-*``) and returns it, so a caller can
journal it *before* a process exists; ``start()`` prepares if that was not done, spawns the
server and returns once the socket answers an NBD handshake; ``stop()`` sends SIGTERM,
SIGKILL after ``STOP_TIMEOUT``, always reaps the process and removes the directory (also when
``start()`` fails or either is cancelled). qemu-nbd locks the image while it runs: another
qemu-img on it needs ``force_share=True`` (``-U``) and may see stale metadata.

Helpers cannot outlive their owner. Servers are spawned with ``PR_SET_PDEATHSIG``
(``PARENT_DEATH_SIGNAL``): when the process that started them dies, even by SIGKILL, the
kernel kills them. The signal fires when the spawning *thread* exits, so start
servers from the thread that runs the event loop for as long as they should live (the CLI
and the daemon run one loop in the main thread). What the kernel cannot clean up, the private
directory, and a server that survived anyway (it ignored the signal, or its owner died in the
instant between fork and prctl), ``stop_leftovers(directory)`` finds by that directory in the
servers' command lines: recovery passes the directories that jobs journaled.
"""

import abc
import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import tempfile
from asyncio.subprocess import DEVNULL, PIPE
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, Self

from engine.core.errors import EngineError
from engine.core.units import KiB
from engine.io.nbd import protocol as nbd_protocol
from engine.io.nbd.client import connect
from engine.io.nbd.errors import NbdConnectionError
from engine.util import failpoints

StrPath = str | os.PathLike[str]

# Opening a large qcow2 (many L1/refcount tables, persistent bitmaps to load) can take
# seconds; a qemu-nbd that has not answered by then is stuck.
START_TIMEOUT: Final = 30.0
# After SIGTERM qemu-nbd drains requests, flushes and exits; a flush stuck on dead storage
# gets SIGKILL after this.
STOP_TIMEOUT: Final = 10.0
# Readiness polling: the first try usually succeeds within milliseconds; back off to the
# maximum so a slow start costs few wakeups.
POLL_FIRST: Final = 0.005
POLL_MAX: Final = 0.1
# How much of a failing process's stderr an error message quotes.
STDERR_TAIL: Final = 4 * KiB
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL (Linux).
MAX_SOCKET_PATH: Final = 107
# Clients qemu-nbd serves at once. Its default of 1 refuses a second reader, and a client
# connecting right after the readiness probe could race the probe's disconnect.
DEFAULT_SHARED: Final = 8
# The private directory of every server: ``stop_leftovers`` removes only directories so named.
WORKDIR_PREFIX: Final = "tessera-nbd-"
# What a server gets when its owner dies. Not SIGTERM: qemu-nbd loses a SIGTERM that arrives
# while it is still opening the image (its main loop resets the flag the handler set), and an
# owner killed just after the spawn is the case this is for. Nothing needs a clean exit: a
# read-only export changes nothing, a killed restore's image is thrown away.
PARENT_DEATH_SIGNAL: Final = signal.SIGKILL
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
# Resolved once here: the preexec function runs in the forked child, which should do as
# little as possible before exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class QemuError(EngineError):
    """A qemu program failed; ``command`` is the shell-quoted command line."""

    template = "{command}: {reason}"


def _tail(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.strip()
    return text[-STDERR_TAIL:] if text else "(no output on stderr)"


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it still runs and wait for it, so no zombie is left."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: take ``PARENT_DEATH_SIGNAL`` when ``parent`` dies.

    A parent that died before the prctl took effect is caught by the ppid check (the child
    was reparented already). Works under uvloop too: it runs ``preexec_fn`` in the child."""
    if _prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) != 0:
        os._exit(127)  # an exec'd server that would outlive us is worse than none
    if os.getppid() != parent:
        os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


# A server's malloc: glibc serves a 1 MiB request buffer from mmap, and then trims the heap
# back after each free; every request of a restore or backup page-faults its buffer in anew
# (measured: 19 % of a restore's CPU was qemu-nbd's page faults). Blocks up to 4 MiB from the
# heap, and the heap kept, take most of that away: a restore into qcow2 went from 513–521 to
# 600–605 MB/s (back to back, the same loaded machine).
SERVER_MALLOC: Final = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=268435456"


def server_env() -> dict[str, str]:
    """The environment an NBD server runs in: ours, with ``SERVER_MALLOC`` (unless the
    caller's environment already tunes glibc)."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", SERVER_MALLOC)
    return env


async def _spawn(
    argv: list[str],
    *,
    stdout: int,
    stderr: int | IO[bytes],
    tied: bool = False,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """Start ``argv``; ``tied``: it gets ``PARENT_DEATH_SIGNAL`` when this process dies."""
    parent = os.getpid()
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=(lambda: _die_with_parent(parent)) if tied else None,
            env=env,
        )
    except OSError as e:  # not installed, not executable
        raise QemuError(command=shlex.join(argv), reason=f"cannot start: {e}") from e


async def qemu_img(*args: StrPath) -> str:
    """Run ``qemu-img ARGS``; return stdout. Raises QemuError with stderr on failure."""
    argv = ["qemu-img", *(os.fspath(a) for a in args)]
    proc = await _spawn(argv, stdout=PIPE, stderr=PIPE)
    try:
        stdout, stderr = await proc.communicate()
    finally:
        await _reap(proc)
    if proc.returncode != 0:
        raise QemuError(
            command=shlex.join(argv), reason=f"exit status {proc.returncode}: {_tail(stderr)}"
        )
    return stdout.decode("utf-8", errors="replace")


async def create(
    path: StrPath,
    fmt: str,
    size: int | None,
    backing: StrPath | None = None,
    backing_fmt: str | None = None,
) -> None:
    """Create an image; ``size`` None takes the backing file's size.

    Without ``backing_fmt`` the backing file's format is read with ``info`` (qemu-img refuses
    to guess it).
    """
    args: list[StrPath] = ["create", "-q", "-f", fmt]
    if backing is not None:
        if backing_fmt is None:
            backing_fmt = str((await info(backing))["format"])
        args += ["-b", os.path.abspath(backing), "-F", backing_fmt]
    elif size is None:
        raise ValueError(f"creating {os.fspath(path)}: a size is needed without a backing file")
    args.append(path)
    if size is not None:
        args.append(str(size))
    await qemu_img(*args)


async def info(
    path: StrPath, *, fmt: str | None = None, force_share: bool = False
) -> dict[str, Any]:
    """``qemu-img info --output=json``. Pass ``fmt`` to skip probing (probing a raw image
    written by a guest is unsafe); ``force_share`` reads an image another process holds."""
    args: list[StrPath] = ["info", "--output=json"]
    if fmt is not None:
        args += ["-f", fmt]
    if force_share:
        args.append("--force-share")
    args.append(path)
    out = await qemu_img(*args)
    data = json.loads(out)
    if not isinstance(data, dict):
        raise QemuError(command=f"qemu-img info {os.fspath(path)}", reason=f"not an object: {out}")
    return data


async def bitmap_add(path: StrPath, name: str, *, granularity: int | None = None) -> None:
    """Add an enabled persistent dirty bitmap to a qcow2 image."""
    args: list[StrPath] = ["bitmap", "--add", "-f", "qcow2"]
    if granularity is not None:
        args += ["-g", str(granularity)]
    await qemu_img(*args, path, name)


async def bitmap_remove(path: StrPath, name: str) -> None:
    """Remove a persistent dirty bitmap from a qcow2 image."""
    await qemu_img("bitmap", "--remove", "-f", "qcow2", path, name)


async def bitmaps(path: StrPath, *, force_share: bool = False) -> list[str]:
    """Names of the persistent bitmaps of a qcow2 image (none for other formats)."""
    data = await info(path, force_share=force_share)
    specific = data.get("format-specific", {}).get("data", {})
    return [str(b["name"]) for b in specific.get("bitmaps", [])]


class NbdServerProcess(abc.ABC):
    """An NBD server process serving on a unix socket in a private temporary directory.

    Subclasses say how to run the server (``argv``); this class starts it, waits for an NBD
    handshake, and stops and reaps it. ``QemuNbd`` is the one Tessera uses; tests run nbdkit
    through it too. The private directory is made in ``base_dir`` (default: the system's
    temporary directory); unix socket paths are limited to ``MAX_SOCKET_PATH`` bytes.
    """

    def __init__(self, export_name: str = "", base_dir: StrPath | None = None) -> None:
        self.export_name = export_name
        self.base_dir = None if base_dir is None else Path(base_dir)
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @abc.abstractmethod
    def argv(self, socket: Path) -> list[str]:
        """The command line serving on ``socket`` (in the foreground, not daemonized)."""

    @property
    def address(self) -> Path:
        """The unix socket to pass to ``nbd.connect``; only while started."""
        if self._dir is None or self._proc is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._dir / "nbd.sock"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def workdir(self) -> Path | None:
        """The private directory (holding ``nbd.sock``) once prepared, until stopped."""
        return self._dir

    def prepare(self) -> Path:
        """Make the private directory and return it; no process yet. Idempotent.

        Journal the directory before ``start()``: ``stop_leftovers`` finds the server by it
        if this process dies before it learnt the pid. ``stop()`` removes it.
        """
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=self.base_dir))
        return self._dir

    async def start(self) -> None:
        """Start the server; return once it answers an NBD handshake.

        Raises QemuError quoting the server's stderr if it exits or does not answer within
        ``START_TIMEOUT``; nothing is left running or on disk then. The failpoint
        ``helper.spawned`` is hit once the process exists, before its pid is known to the
        caller.
        """
        if self._proc is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        socket = self.prepare() / "nbd.sock"
        argv = self.argv(socket)
        try:
            if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
                raise ValueError(f"unix socket path {socket} is too long; use a shorter base_dir")
            with open(self.prepare() / "stderr", "wb") as stderr:
                # stderr goes to a file: a pipe nobody drains would block the server when full.
                self._proc = await _spawn(
                    argv, stdout=DEVNULL, stderr=stderr, tied=True, env=server_env()
                )
            failpoints.hit("helper.spawned")
            await self._wait_ready(self._proc, socket, shlex.join(argv))
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(
        self, proc: asyncio.subprocess.Process, socket: Path, command: str
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        delay = POLL_FIRST
        while True:
            if proc.returncode is not None:
                raise QemuError(
                    command=command,
                    reason=f"exited with status {proc.returncode} before serving: {self._stderr()}",
                )
            if socket.exists():
                try:
                    async with asyncio.timeout(max(deadline - loop.time(), POLL_FIRST)):
                        client = await connect(socket, self.export_name, meta_contexts=())
                except (NbdConnectionError, TimeoutError):
                    pass  # bound but not listening yet; the deadline below decides
                else:
                    await client.close()
                    return
            if loop.time() >= deadline:
                raise QemuError(
                    command=command,
                    reason=f"no NBD handshake within {START_TIMEOUT:.0f} s: {self._stderr()}",
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await proc.wait()  # wakes early if the server exits
            delay = min(delay * 2, POLL_MAX)

    def _stderr(self) -> str:
        if self._dir is None:
            return "(no stderr kept)"
        try:
            return _tail((self._dir / "stderr").read_bytes())
        except OSError as e:
            return f"(stderr unreadable: {e})"

    async def stop(self) -> None:
        """Terminate the server (SIGKILL after ``STOP_TIMEOUT``), reap it, remove its directory.

        Idempotent; clients still connected see their connection closed.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await proc.wait()
        finally:
            try:
                if proc is not None:
                    await _reap(proc)
            finally:
                if self._dir is not None:
                    shutil.rmtree(self._dir, ignore_errors=True)
                    self._dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class QemuNbd(NbdServerProcess):
    """qemu-nbd serving one image.

    ``bitmap`` exports that persistent bitmap as ``qemu:dirty-bitmap:NAME``. Writable exports
    pass discards through (``--discard=unmap``) so zeroed ranges can become holes. ``cache`` is
    qemu-nbd's ``--cache`` (None keeps its default, writeback). ``shared`` clients may be
    connected at once.
    """

    def __init__(
        self,
        image: StrPath,
        fmt: str,
        *,
        read_only: bool = False,
        cache: Literal["none", "writeback"] | None = None,
        bitmap: str | None = None,
        shared: int = DEFAULT_SHARED,
        export_name: str = "",
        base_dir: StrPath | None = None,
    ) -> None:
        if shared < 1:
            raise ValueError(f"qemu-nbd must serve at least one client, not {shared}")
        super().__init__(export_name, base_dir)
        self.image = Path(image)
        self.fmt = fmt
        self.read_only = read_only
        self.cache = cache
        self.bitmap = bitmap
        self.shared = shared

    @property
    def meta_contexts(self) -> tuple[str, ...]:
        """The contexts this export offers: allocation, and the bitmap if one is exported."""
        if self.bitmap is None:
            return (nbd_protocol.BASE_ALLOCATION,)
        return (nbd_protocol.BASE_ALLOCATION, nbd_protocol.DIRTY_BITMAP_PREFIX + self.bitmap)

    def argv(self, socket: Path) -> list[str]:
        argv = [
            "qemu-nbd",
            f"--format={self.fmt}",
            f"--socket={socket}",
            "--persistent",
            f"--shared={self.shared}",
        ]
        if self.export_name:
            argv.append(f"--export-name={self.export_name}")
        if self.read_only:
            argv.append("--read-only")
        else:
            argv.append("--discard=unmap")
        if self.cache is not None:
            argv.append(f"--cache={self.cache}")
        if self.bitmap is not None:
            argv.append(f"--bitmap={self.bitmap}")
        argv.append(os.fspath(self.image))
        return argv


def processes_naming(workdir: StrPath) -> list[int]:
    """Pids of live processes (not this one) whose command line names a path in ``workdir``.

    A server's private directory is unique (``mkdtemp``), so this finds exactly the server
    that was started in it, whether or not its pid was ever recorded. Zombies have no
    command line and are not listed.
    """
    needle = os.fsencode(os.path.abspath(workdir)) + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if any(needle in arg for arg in argv):
            found.append(int(entry.name))
    return found


async def stop_leftovers(workdir: StrPath) -> list[int]:
    """Stop the server a dead process left in ``workdir`` and remove the directory.

    SIGTERM, SIGKILL after ``STOP_TIMEOUT``; returns the pids that were signalled. Idempotent:
    no process and no directory is success. Refuses (ValueError) a directory that is not a
    server's private one, so a damaged journal cannot make recovery delete anything else.
    """
    path = Path(os.path.abspath(workdir))
    if not path.name.startswith(WORKDIR_PREFIX):
        raise ValueError(f"{path} is not an NBD server's private directory")
    pids = processes_naming(path)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_naming(path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        delay = POLL_FIRST
        while processes_naming(path) and loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        if not processes_naming(path):
            break
    shutil.rmtree(path, ignore_errors=True)
    return pids
