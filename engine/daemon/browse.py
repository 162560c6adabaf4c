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
    download(path)   ─► the helper writes the file (or ``tar_out`` of a directory) into
                        <serve.state_dir>/files/<session>/ (0700); the caller gets an open
                        descriptor of it, already unlinked, and streams it: nothing holds a
                        whole file in memory, nothing is left behind by a client that leaves

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
from collections.abc import AsyncIterator, Sequence
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
    active: int = 0  # requests in progress
    requests: int = 0  # requests served

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


@dataclass
class Download:
    """A file ready to stream: ``fd`` (unlinked already; the caller closes it), its size
    and the name to give it."""

    fd: int
    size: int
    name: str
    content_type: str


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
                    while True:  # until idle (or cancelled)
                        session.changed.clear()
                        try:
                            async with asyncio.timeout(idle):
                                await session.changed.wait()
                        except TimeoutError:
                            if session.active == 0:
                                view.say(f"idle for {section.files_idle}: ending the session")
                                break
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
        """A regular file as itself, a directory as a tar archive (``name.tar``); other
        kinds (links, devices) are refused (ConfigError, 400)."""
        path = check_path(path)
        async with self._use(session_id) as tree:
            session = self.get(session_id)
            entry = await tree.stat(path)
            name = entry.name or "root"
            file = session.directory / f"download-{os.urandom(8).hex()}"
            try:
                if entry.kind == "file":
                    size = await tree.download(path, file)
                    kind = "application/octet-stream"
                elif entry.kind == "dir":
                    size = await tree.tar(path, file)
                    name, kind = f"{name}.tar", "application/x-tar"
                else:
                    raise ConfigError(
                        message=f"{path} is a {entry.kind}"
                        + (f" to {entry.target}" if entry.target else "")
                        + ": only files and directories are downloaded"
                    )
                fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            finally:
                with contextlib.suppress(OSError):
                    file.unlink()
            return Download(fd, size, name, kind)


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
