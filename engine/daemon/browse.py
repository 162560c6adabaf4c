"""File browsing sessions: a snapshot's guest filesystems held open in an appliance between
API requests (``/v1/snapshots/{id}/files``, ``/v1/files/{session}``), for a web page that
browses and downloads.

An appliance boots in seconds with KVM and ~30 s under TCG, so it is booted once per
session, not per request::

    open(snapshot, disks) ─► job of kind ``files`` (open-ended; the session id is its id)
        body: snapshot share-locked ─► GuestTree.open (exports + appliance helper)
              state starting ─► ready (filesystems known) ─► waits while used
        ends: DELETE /v1/files/{id} or the job's cancel → cancelled; idle for
              ``serve.files_idle`` → succeeded; a boot that fails → failed.
              The appliance (helper, qemu), its exports and the session's directory go.
    ls / find / stat ─► one helper request each (one at a time per session)
    download(path)   ─► a transfer task (the session's task group): the helper writes the
                        file (or ``tar_out`` of a directory) into a file of
                        <serve.state_dir>/files/<session>/ (0700), unlinked once written;
                        the caller reads it as it grows (``Download.blocks``) and streams
                        it: nothing holds a whole file in memory, the first byte need not
                        wait for the last, a client that leaves leaves nothing behind.
                        A write that fails (the state dir full: ENOSPC) fails the helper's
                        request naming the file and the errno; the file goes all the same,
                        the session stays ready, and the reader raises after the bytes
                        written (the API answers an error before any byte, else cuts)

At most ``serve.files_sessions`` sessions at once (``SessionsFull``, the API's 503); a
request to a session still booting or ended is ``NotReady`` (409); the last ``ENDED_KEPT``
ended sessions still show their state and error; an unknown session is a ConfigError ``no
files session …`` (404). A request in progress keeps the session from
ending idle. Paths are checked (``engine.restore.files.check_path``) before they reach the
appliance.
"""

import asyncio
import collections
import contextlib
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from engine.app.stores import JobStore
from engine.core.errors import ConfigError, EngineError, SnapshotNotFound
from engine.daemon.context import DaemonContext
from engine.daemon.exports import private_dir
from engine.daemon.jobs import JobView
from engine.jobs.restore import select_disks
from engine.restore.files import GuestTree, check_path
from engine.restore.tree import Entry
from engine.store.manifest import DiskEntry, Manifest

log = structlog.get_logger("tessera.browse")

KIND: Final = "files"
ENDED_KEPT: Final = 32  # ended sessions still answered (state, error) by ``get``
DOWNLOAD_BLOCK: Final = 1 << 20  # bytes read (in a thread) and sent at a time
# How long a reader that caught up with the helper waits before it looks for more bytes
# (a file grows without telling anyone; the end of the transfer wakes it at once).
FOLLOW_INTERVAL: Final = 0.1


class SessionsFull(EngineError):
    template = "{count} files sessions are open, the most serve.files_sessions allows; end one"


class NotReady(EngineError):
    template = "files session {session} is {state}"


@dataclass
class Session:
    """One session: its job's id, what it reads, its state and tree once booted."""

    id: str
    store: str
    manifest: Manifest
    disks: Sequence[DiskEntry]
    directory: Path
    state: str = "starting"  # starting | ready | ended
    error: str | None = None
    tree: GuestTree | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # state or use
    active: int = 0  # requests in progress (a download's transfer included)
    requests: int = 0  # requests served
    transfers: asyncio.TaskGroup | None = None  # the helper writing downloads (``_run``'s)

    def doc(self) -> dict[str, Any]:
        fs = [asdict(f) for f in self.tree.filesystems] if self.tree is not None else []
        return {
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "store": self.store,
            "snapshot": self.manifest.snapshot_id,
            "vm": self.manifest.vm_name,
            "disks": [{"id": d.disk_id, "name": d.name, "size": d.size} for d in self.disks],
            "filesystems": fs,
        }


class Download:
    """A download being written by the appliance's helper into an unlinked file of the
    session's directory, read as it grows (``blocks``): the first byte goes out long before
    the helper wrote the last. ``size``: the file's length, None for a tar archive (known only
    at its end). The caller iterates ``blocks`` once and then ``close``s; a client that goes
    away early leaves the transfer to finish in the session's task group, its file already
    unlinked."""

    def __init__(self, fd: int, size: int | None, name: str, content_type: str) -> None:
        self.fd, self.size, self.name, self.content_type = fd, size, name, content_type
        self.done = asyncio.Event()  # the helper has answered
        self.error: BaseException | None = None  # what it answered, when it failed

    async def blocks(self) -> AsyncGenerator[bytes, None]:
        """The bytes, ``DOWNLOAD_BLOCK`` at a time, as the helper writes them; raises the
        helper's error (ApplianceError) if the transfer failed."""
        sent = 0
        while True:
            finished = self.done.is_set()  # before the read: all it wrote is in the file
            block = await asyncio.to_thread(os.pread, self.fd, DOWNLOAD_BLOCK, sent)
            if block:
                sent += len(block)
                yield block
                continue
            if finished:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOW_INTERVAL):
                    await self.done.wait()  # or more bytes: read again after a moment
        if self.error is not None:
            raise self.error
        if self.size is not None and sent != self.size:
            raise ConfigError(message=f"{self.name}: {sent} bytes written of {self.size}")

    def close(self) -> None:
        """Close the staging file (idempotent): its space is free once the helper is done."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class Sessions:
    """The daemon's browsing sessions (``Service.sessions``)."""

    def __init__(self, ctx: DaemonContext) -> None:
        self._ctx = ctx
        self._open: dict[str, Session] = {}
        self._ended_recently: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def root(self) -> Path:
        config = self._ctx.config
        return config.serve.state(config.scheduler.state_file) / "files"

    async def open(
        self, snapshot: str, *, store: str | None = None, disks: Sequence[str] = ()
    ) -> Session:
        """Start a session (its job boots the appliance); returns at once, ``starting``.
        SnapshotNotFound (404) for an unknown snapshot or disk, ``SessionsFull`` (503)."""
        section = self._ctx.config.serve
        if len(self._open) >= section.files_sessions:
            raise SessionsFull(count=len(self._open))
        handle = self._ctx.store(store)
        snapshot_id, manifest, chosen = await asyncio.to_thread(_resolve, handle, snapshot, disks)
        root = await asyncio.to_thread(private_dir, self.root())
        params: dict[str, Any] = {"store": handle.name, "snapshot": snapshot_id}
        params |= {"disks": [d.name for d in chosen]}
        holder: list[Session] = []

        async def body(view: JobView) -> tuple[str, dict[str, Any]]:
            (session,) = holder
            return await self._run(session, handle, view)

        view = self._ctx.jobs.submit(
            KIND, f"snapshot:{snapshot_id}", body, params=params, open_ended=True
        )
        session = Session(view.job_id, handle.name, manifest, chosen, root / view.job_id)
        holder.append(session)
        self._open[session.id] = session
        if view.task is not None:  # also when cancelled before its body ran
            view.task.add_done_callback(lambda _: self._ended(session))
        return session

    def _ended(self, session: Session) -> None:
        session.state, session.tree = "ended", None
        session.changed.set()
        if self._open.pop(session.id, None) is not None:
            self._ended_recently[session.id] = session
            while len(self._ended_recently) > ENDED_KEPT:
                self._ended_recently.popitem(last=False)

    async def _run(self, session: Session, handle: JobStore, view: JobView) -> tuple[str, Any]:
        section = self._ctx.config.serve
        idle = section.files_idle.delta.total_seconds()
        try:
            await asyncio.to_thread(private_dir, session.directory)
            with handle.store.reading_snapshot(session.manifest.snapshot_id):
                async with GuestTree.open(
                    handle.store,
                    handle.pool,
                    session.manifest,
                    session.disks,
                    launch_timeout=section.files_launch_timeout.delta.total_seconds(),
                ) as tree:
                    session.tree, session.state = tree, "ready"
                    names = ", ".join(f"{f.name} ({f.fstype})" for f in tree.filesystems)
                    view.say(f"appliance up: {names or 'no filesystem'}")
                    session.changed.set()
                    async with asyncio.TaskGroup() as transfers:
                        session.transfers = transfers
                        while True:  # until idle (or cancelled)
                            session.changed.clear()
                            try:
                                async with asyncio.timeout(idle):
                                    await session.changed.wait()
                            except TimeoutError:
                                if session.active == 0:
                                    view.say(f"idle for {section.files_idle}: ending it")
                                    break
                        session.transfers = None
        except Exception as e:
            session.error = str(e)
            raise
        finally:
            view.summary = {"requests": session.requests}
            self._ended(session)
            await asyncio.to_thread(shutil.rmtree, session.directory, True)
        return "succeeded", {"requests": session.requests}

    # -- what the API asks ------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        """An open session, or one that ended recently (state ``ended``, its ``error`` why:
        a client polling a boot that failed learns the reason)."""
        session = self._open.get(session_id) or self._ended_recently.get(session_id)
        if session is None:
            raise ConfigError(message=f"no files session {session_id!r}")
        return session

    async def wait(self, session_id: str, timeout: float) -> Session:
        """The session once it is not ``starting`` any more, or after ``timeout`` seconds."""
        session = self.get(session_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while session.state == "starting":
                    await session.changed.wait()
        return session

    @contextlib.asynccontextmanager
    async def _use(self, session_id: str) -> AsyncIterator[GuestTree]:
        session = self.get(session_id)
        if session.state != "ready" or session.tree is None:
            raise NotReady(session=session_id, state=session.state)
        session.active += 1
        session.requests += 1
        session.changed.set()
        try:
            yield session.tree
        finally:
            session.active -= 1
            session.changed.set()

    def end(self, session_id: str) -> JobView:
        """Cancel the session's job; ``AlreadyEnded`` (409) when it has ended."""
        self.get(session_id)
        return self._ctx.jobs.cancel(session_id)

    async def ls(self, session_id: str, path: str) -> list[Entry]:
        path = check_path(path)
        async with self._use(session_id) as tree:
            return await tree.ls(path)

    async def find(self, session_id: str, path: str, pattern: str | None) -> list[str]:
        path = check_path(path)
        async with self._use(session_id) as tree:
            return await tree.find(path, pattern)

    async def download(self, session_id: str, path: str) -> Download:
        """A regular file as itself, a directory as a tar archive (``name.tar``), being
        written (``Download``); other kinds (links, devices) are refused (ConfigError, 400),
        a path that is not there is PathNotFound (404), both before any byte."""
        path = check_path(path)
        async with self._use(session_id) as tree:
            session = self.get(session_id)
            entry = await tree.stat(path)
            if entry.kind not in ("file", "dir"):
                raise ConfigError(
                    message=f"{path} is a {entry.kind}"
                    + (f" to {entry.target}" if entry.target else "")
                    + ": only files and directories are downloaded"
                )
            if session.transfers is None:
                raise NotReady(session=session_id, state="ending")
            file = session.directory / f"download-{os.urandom(8).hex()}"
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            if entry.kind == "file":
                got = Download(fd, entry.size, entry.name, "application/octet-stream")
            else:
                got = Download(fd, None, f"{entry.name or 'root'}.tar", "application/x-tar")
            session.active += 1  # the transfer keeps the session from ending idle

            async def transfer() -> None:
                try:
                    if entry.kind == "file":
                        await tree.download(path, file)
                    else:
                        await tree.tar(path, file)
                except Exception as e:  # noqa: BLE001 - the reader raises it, not the group
                    got.error = e
                    log.warning(
                        "files.download_failed",
                        session=session.id,
                        path=path,
                        file=str(file),
                        error=str(e),
                    )
                finally:
                    with contextlib.suppress(OSError):
                        file.unlink()
                    got.done.set()
                    session.active -= 1
                    session.changed.set()

            session.transfers.create_task(transfer(), name=f"download {path}")
            return got


def _resolve(
    handle: JobStore, snapshot: str, wanted: Sequence[str]
) -> tuple[str, Manifest, list[DiskEntry]]:
    snapshot_id = handle.store.resolve(snapshot)
    manifest = handle.store.manifest(snapshot_id)
    disks = [] if wanted else list(manifest.disks)
    for name in wanted:
        disks += [d for d in select_disks(manifest, name) if d not in disks]
    if not disks:
        raise SnapshotNotFound(snapshot=snapshot_id, reason="no disk chosen")
    return snapshot_id, manifest, disks
