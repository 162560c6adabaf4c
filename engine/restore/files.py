"""Files out of a restore point without restoring the VM: a snapshot's guest filesystems, read
in a throwaway appliance VM (libguestfs), as one read-only tree.

::

    store ─► SnapshotExport per disk ─► NBD server on a unix socket (0600, private dir)
                                          ▲ qemu of the appliance (each disk a read-only
                                          │ drive, writes to a temporary overlay)
    GuestTree ─ JSON lines ─► helper process (``engine.restore.appliance``: the libguestfs
                              handle) ─► appliance kernel: partitions, LVM, ext2/3/4, XFS,
                              NTFS, btrfs, vfat …
    tree:  /<fs>/…   one directory per filesystem, named from its device: /sda1, /sdb2,
                     /vg0-lv0 (an LVM volume); every path of ``ls``/``find``/``get`` and
                     every ``mount`` starts with one

Why an appliance (the design's choice, DESIGN §8): a guest filesystem is untrusted input: it is
parsed by the appliance's kernel, never by the DataMover's (which a crafted image could
attack); it works unprivileged with ``/dev/kvm`` (no loop devices, no host mounts, no host
LVM: a guest's volume group can never clash with the DataMover's own); and one mechanism
covers every filesystem and volume manager the appliance's kernel knows. The backup is never
written: the NBD exports are read-only, and what the appliance's kernel writes when it mounts
(an ext4 or XFS journal replayed, an NTFS log) lands in qemu's throwaway overlay, so a
crash-consistent snapshot is read as the guest would see it after its own recovery.

Costs: an appliance boot per ``GuestTree`` (2–4 s with KVM; 15–25 s without, under TCG),
and libguestfs with its Python bindings installed (``engine.io.guestfs``). Where KVM is there
but cannot boot a guest (some nested set-ups hang), ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``
makes libguestfs emulate; a launch that does not come up in ``launch_timeout`` seconds is
killed and reported (``ApplianceError``).

libguestfs runs in a helper process (``engine.restore.appliance``): its Python calls keep the
GIL while they wait for the appliance, which waits for the exports this process serves. The
helper is its own process group; leaving ``open`` (also by an error or a cancellation) ends
it and the appliance with it.
"""

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Final

import structlog

from engine.core.errors import ConfigError, EngineError
from engine.io import guestfs as guestfs_bindings
from engine.io.nbd.serve import Listener, serve
from engine.io.nbd.server import ExportSpec
from engine.io.qemu import MAX_SOCKET_PATH
from engine.restore.export import SnapshotExport
from engine.restore.tree import Entry, Filesystem, FsCheck, PathCheck
from engine.store.manifest import DiskEntry, Manifest
from engine.store.protocols import ChunkReader
from engine.workers.pool import CpuPool

log = structlog.get_logger("tessera.files")

DEFAULT_LAUNCH_TIMEOUT: Final = 300.0  # a TCG boot on a busy 2-core machine takes ~30 s
APPLIANCE_PREFIX: Final = "tessera-files-"
HELPER_LINE_LIMIT: Final = 64 << 20  # one answer (a find of a large tree) is one line
HELPER_EXIT_TIMEOUT: Final = 30.0  # for the appliance's orderly shutdown
MAX_DAMAGE_SHOWN: Final = 3  # store read failures named in one error


class ApplianceError(EngineError):
    """The appliance could not read the snapshot (no boot, a request failed, the helper died)."""

    template: ClassVar[str] = "snapshot {snapshot}: {reason}"


class PathNotFound(ApplianceError):
    """A path of the tree that is not there (ENOENT, ENOTDIR in the appliance)."""

    template: ClassVar[str] = "snapshot {snapshot}: {reason}"


class BadPath(EngineError):
    """A path that is not an absolute path of the tree (``..``, relative, a NUL byte)."""

    template: ClassVar[str] = "{path!r}: give an absolute path of the tree (/sda1/etc), no '..'"


def check_path(path: str) -> str:
    """``path`` normalised (``//`` and ``/./`` folded); ``BadPath`` when it is relative, holds
    ``..`` or a NUL byte: names come from clients, and the tree's are untrusted data."""
    p = PurePosixPath(path)
    if not path or "\0" in path or not p.is_absolute() or ".." in p.parts:
        raise BadPath(path=path)
    return "/" + "/".join(p.parts[1:])  # POSIX keeps a leading "//": not here


_NOT_THERE: Final = (2, 20)  # ENOENT, ENOTDIR


def check_socket_room(disks: int) -> None:
    """ConfigError unless the disks' NBD sockets, in a directory ``tempfile`` makes (under
    ``$TMPDIR``), fit a unix socket address (``sockaddr_un``: 107 bytes): a deeper TMPDIR
    would fail later as a bare ``AF_UNIX path too long``."""
    longest = Path(tempfile.gettempdir()) / f"{APPLIANCE_PREFIX}{'x' * 8}" / f"disk{disks}.sock"
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        raise ConfigError(
            message=f"the appliance's disk sockets would have paths of {len(os.fsencode(longest))}"
            f" bytes under the temporary directory {tempfile.gettempdir()}; a unix socket's holds"
            f" at most {MAX_SOCKET_PATH}: set TMPDIR to a shorter directory"
        )


class GuestTree:
    """The filesystems of a snapshot's disks, mounted read-only in an appliance; build with
    ``open``. Paths are POSIX paths of the tree (``/sda1/etc/hostname``)."""

    def __init__(
        self,
        helper: asyncio.subprocess.Process,
        snapshot: str,
        exports: Sequence[SnapshotExport] = (),
    ) -> None:
        self._helper = helper
        self.snapshot = snapshot
        self._exports = exports  # their ``failures`` name the damage the appliance saw as EIO
        self.qemu: int | None = None  # the appliance's qemu (killed with the helper)
        self.filesystems: list[Filesystem] = []
        self._lock = asyncio.Lock()  # one request at a time
        self._events: dict[str, Callable[[], None]] = {}  # event → callback, once

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        store: ChunkReader,
        pool: CpuPool,
        manifest: Manifest,
        disks: Sequence[DiskEntry],
        *,
        launch_timeout: float | None = None,
    ) -> AsyncIterator["GuestTree"]:
        """Serve ``disks`` of ``manifest`` and boot the appliance on them; the tree until the
        block exits (then the helper and its appliance are ended and the exports stopped).
        The caller holds the snapshot (``store.reading_snapshot``) and owns store and pool."""
        guestfs_bindings.load()  # here: a missing package is a ConfigError, not a dead helper
        check_socket_room(len(disks))
        snapshot = manifest.snapshot_id
        workdir = Path(tempfile.mkdtemp(prefix=APPLIANCE_PREFIX))
        try:
            async with contextlib.AsyncExitStack() as stack:
                servers: list[asyncio.Task[None]] = []
                sockets = []
                exports = []
                try:
                    for i, disk in enumerate(disks):
                        export = await stack.enter_async_context(
                            SnapshotExport.open(store, pool, manifest, disk)
                        )
                        exports.append(export)
                        sockets.append(workdir / f"disk{i}.sock")
                        spec = ExportSpec(
                            name="",
                            size=disk.size,
                            read_only=True,
                            multi_conn=True,
                            preferred_block=manifest.chunk_size,
                        )
                        ready = asyncio.get_running_loop().create_future()
                        listeners = [Listener(path=sockets[-1])]
                        server = asyncio.create_task(serve(export, spec, listeners, ready=ready))
                        servers.append(server)
                        await asyncio.wait([ready, server], return_when=asyncio.FIRST_COMPLETED)
                        if not ready.done():
                            await server  # it could not listen: raises why
                    helper = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "engine.restore.appliance",
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        start_new_session=True,  # its own group: killed with its qemu
                        limit=HELPER_LINE_LIMIT,
                    )
                    tree = cls(helper, snapshot, exports)
                    try:
                        timeout = launch_timeout or DEFAULT_LAUNCH_TIMEOUT
                        await tree._launch(sockets, disks, timeout)
                        yield tree
                    finally:
                        await tree_end(helper, tree.qemu)
                finally:
                    for server in servers:
                        server.cancel()
                    await asyncio.gather(*servers, return_exceptions=True)
        finally:
            with contextlib.suppress(OSError):
                for leftover in workdir.iterdir():
                    leftover.unlink()
                workdir.rmdir()

    async def _request(self, op: str, **fields: object) -> Any:
        """One request to the helper; its answer, or ``ApplianceError``."""
        async with self._lock:
            return await self._exchange({"op": op, **fields})

    async def _exchange(self, request: dict[str, object]) -> Any:
        helper = self._helper
        assert helper.stdin is not None
        assert helper.stdout is not None
        before = [collections.Counter(e.failures) for e in self._exports]
        try:
            helper.stdin.write((json.dumps(request) + "\n").encode())
            await helper.stdin.drain()
        except (ConnectionError, RuntimeError):  # it is gone: the read below says how
            pass
        while True:
            line = await helper.stdout.readline()
            if not line:
                code = await helper.wait()
                raise ApplianceError(
                    snapshot=self.snapshot,
                    reason=f"the appliance helper ended (exit status {code}) during "
                    f"{request['op']}" + self._damage(before),
                )
            answer = json.loads(line)
            if "event" in answer:
                self._on_event(answer["event"])
                continue
            if "error" in answer:
                reason = answer["error"] + self._damage(before)
                kind = PathNotFound if answer.get("errno") in _NOT_THERE else ApplianceError
                raise kind(snapshot=self.snapshot, reason=reason)
            return answer["ok"]

    def _damage(self, before: list[collections.Counter[str]]) -> str:
        """What the exports could not read from the store since ``before`` (the appliance
        saw only EIO), as a sentence to add to an error; empty when nothing failed."""
        seen = []
        for export, earlier in zip(self._exports, before, strict=True):
            seen += [text for text in export.failures if text not in earlier]
        if not seen:
            return ""
        shown = "; ".join(seen[:MAX_DAMAGE_SHOWN])
        more = f" (and {len(seen) - MAX_DAMAGE_SHOWN} more)" if len(seen) > MAX_DAMAGE_SHOWN else ""
        return f"; the store could not supply what the appliance read: {shown}{more}"

    def _on_event(self, event: str) -> None:
        callback = self._events.pop(event, None)
        if callback is not None:
            callback()

    async def _launch(
        self, sockets: Sequence[Path], disks: Sequence[DiskEntry], timeout: float
    ) -> None:
        request = self._request(
            "launch", sockets=[str(s) for s in sockets], disks=[d.name for d in disks]
        )
        try:
            async with asyncio.timeout(timeout):
                answer = await request
        except TimeoutError:
            _kill_tree(self._helper.pid)
            raise ApplianceError(
                snapshot=self.snapshot,
                reason=f"the appliance did not start within {timeout:.0f} s and was killed "
                "(KVM that cannot boot a guest, as in some nested set-ups? "
                "LIBGUESTFS_BACKEND_SETTINGS=force_tcg runs it emulated)",
            ) from None
        self.qemu = answer["qemu"]
        self.filesystems = [Filesystem(**f) for f in answer["filesystems"]]
        log.info(
            "files.appliance.up",
            snapshot=self.snapshot,
            filesystems=[f"{f.name}:{f.fstype}" for f in self.filesystems],
        )

    # --- reading ---------------------------------------------------------------------------

    def _check(self, path: str) -> str:
        return check_path(path)

    async def ls(self, path: str) -> list[Entry]:
        """The entries of directory ``path`` (or ``path`` itself when it is not one)."""
        return [Entry(**e) for e in await self._request("ls", path=self._check(path))]

    async def find(self, path: str, pattern: str | None = None) -> list[str]:
        """Every path under ``path`` (whose last part matches the glob ``pattern``)."""
        found: list[str] = await self._request("find", path=self._check(path), pattern=pattern)
        return found

    async def get(self, path: str, dest: Path) -> int:
        """Copy ``path`` (a file, or a directory with everything under it) into ``dest``,
        a directory; returns the files written."""
        count: int = await self._request("get", path=self._check(path), dest=str(dest.resolve()))
        return count

    async def stat(self, path: str) -> Entry:
        """``path`` itself (a link not followed)."""
        return Entry(**await self._request("stat", path=self._check(path)))

    async def download(self, path: str, file: Path) -> int:
        """The regular file ``path`` written into ``file`` (made or replaced; in a directory
        only this process's user can enter); returns its size."""
        size: int = await self._request("download", path=self._check(path), file=str(file))
        return size

    async def tar(self, path: str, file: Path) -> int:
        """The directory ``path`` and everything under it as an uncompressed tar archive
        in ``file`` (as ``download``); returns the archive's size."""
        size: int = await self._request("tar", path=self._check(path), file=str(file))
        return size

    async def mount(self, directory: Path, ready: Callable[[], None]) -> None:
        """Show the tree read-only at ``directory`` (FUSE) until it is unmounted
        (``fusermount -u DIR`` or ``umount DIR``); ``ready`` is called once it is there."""
        self._events = {"mounted": ready}
        await self._request("mount", dir=str(directory.resolve()))

    async def check(self, expect: Sequence[str] = ()) -> tuple[list[FsCheck], list[PathCheck]]:
        """Check every filesystem with its own checker in no-write mode, and look up the
        ``expect``-ed paths (``engine.restore.fsck``); the filesystems stay as they were."""
        paths = [self._check(p) for p in expect]
        found = await self._request(
            "check", filesystems=[asdict(f) for f in self.filesystems], expect=paths
        )
        return (
            [FsCheck(**f) for f in found["filesystems"]],
            [PathCheck(**p) for p in found["paths"]],
        )


async def tree_end(helper: asyncio.subprocess.Process, qemu: int | None = None) -> None:
    """Ask the helper to quit (it shuts the appliance down), then kill its group if it has
    not within ``HELPER_EXIT_TIMEOUT``; always reaped. ``qemu`` (the appliance's process, as
    the helper reported it) is killed too if it outlived the helper: a helper that died
    (killed, crashed) leaves its qemu to init, out of reach of ``_kill_tree``."""
    if helper.returncode is None and helper.stdin is not None:
        with contextlib.suppress(OSError, RuntimeError):
            helper.stdin.write(b'{"op": "quit"}\n')
            helper.stdin.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HELPER_EXIT_TIMEOUT):
                await helper.wait()
    _kill_tree(helper.pid)  # still there, or a qemu it left behind
    await helper.wait()
    if qemu is not None:
        await _end_orphan(qemu)


async def _end_orphan(pid: int) -> None:
    """SIGKILL the appliance's qemu ``pid`` if it is still one, and wait until it has exited.

    It is no child of ours, so it cannot be reaped here: a pidfd (held before the check, so
    the pid cannot be reused under us) becomes readable once every thread of it has exited.
    A SIGKILLed qemu takes a while to tear its memory down; returning before that let a
    caller see it still running after the tree had ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not _is_qemu(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        exited = loop.create_future()
        loop.add_reader(fd, _settle, exited)
        try:
            async with asyncio.timeout(HELPER_EXIT_TIMEOUT):
                await exited
        except TimeoutError:
            log.warning("appliance.qemu_outlived_kill", pid=pid, waited_s=HELPER_EXIT_TIMEOUT)
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _is_qemu(pid: int) -> bool:
    """Whether ``pid`` is still a qemu process (not a reused pid of something else)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("qemu")
    except OSError:
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process under ``pid`` (libguestfs starts
    qemu in a group of its own), deepest first."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    under, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            under.append(child)
            todo.append(child)
    for victim in reversed(under):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
