"""The job journal: one JSON file per job, rewritten atomically at every transition.

A record says what the job is (kind, params), where it is (state), what it has created that
must not outlive it (``resources``, e.g. a qemu-nbd pid, a bitmap name, a target file) and
how it ended (summary, error, warnings). Records of finished jobs are kept, up to
``KEEP_FINISHED`` (oldest dropped first), but nothing reads them back: the job history the
daemon, the API and ``tessera jobs`` show is ``history``.

Writes never block the event loop. ``create``, ``save`` and ``save_summary`` are coroutines:
the record is serialized at once, on the caller's thread, then written, fsynced, renamed
and its directory fsynced (``atomic_write``) on the journal's one writer thread, and the
coroutine returns when the record is durable. One thread keeps the saves in the order they
were asked for, across all the jobs of a journal, so an older state never overwrites a newer
one. That is what crash safety needs: a caller awaits the save that names a resource before
it creates the resource, and the driver awaits a state's save before acting on it.

::

    loop thread                          writer thread (one per journal, FIFO)
    save(r): r → JSON bytes ───queue───▶ tmp write, fsync, rename, fsync dir
             await (the loop runs on)    ... done ──▶ save returns: r is durable

A save whose caller is cancelled while it waits is still written, in its turn (a later save
of the record comes after it); the caller sees the cancellation at once. The driver, which
must not act on an unsaved state, waits for it anyway (``queue_save``). Reads (``load``,
``records``, ``unfinished``) and ``prune`` block: call them in a thread from the loop.

Several processes. The store's writer (the daemon, or a command holding the writer lock)
runs backups; restores (local images, new VMs, no store writes) run in any process beside
it, on a read-only store, and journal here too. So a record names its *owner*: a file
``owners/NAME`` that the process holds ``flock(LOCK_EX)`` on from its first ``create`` until
it exits (the kernel drops the lock when it dies, even by SIGKILL). ``alive(record)``: the
owner's lock is held. Recovery takes only records whose owner is dead (or that name none:
written before owners existed), one recovery at a time (``lock_recovery``)::

    owner file   made as owners/.NAME.tmp (O_EXCL), locked, then renamed to owners/NAME:
                 a file under its final name is always locked by a live owner, or dead
    alive(r)     r.owner is ours; or owners/r.owner is locked by someone (LOCK_NB fails)
    prune        also deletes owners/NAME it can lock (a dead owner), holding the lock
"""

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from engine.core.errors import StoreWriteError
from engine.jobs.states import TERMINAL, State
from engine.store.failure import write_failure
from engine.util.fs import atomic_write

log = structlog.get_logger("tessera.jobs")

DAMAGED_SUFFIX: Final = ".damaged"
KEEP_FINISHED: Final = 1000  # a year of daily jobs for a few VMs; files are ~1 KiB
OWNERS: Final = "owners"  # the owner lock files (module docstring)
RECOVERY_LOCK: Final = "recovery.lock"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class JobRecord:
    job_id: str
    kind: str  # backup | restore
    source: str  # plugin name that owns the resources (local, ovirt…)
    state: State = State.PENDING
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    pid: int = field(default_factory=os.getpid)
    owner: str = ""  # the owner lock's name (``Journal.alive``); "": written before owners
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    integrity: bool = False  # the error was an IntegrityError: stored data is wrong (alert)
    warnings: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # "time state" per transition

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL


def new_job_id() -> str:
    """Sortable by start time, unique enough for one store: ``20261128T130236-0cf2a2``."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


class Journal:
    """The records of one directory (module docstring: writes on one thread, in order)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.damaged: list[str] = []  # unreadable records set aside by ``records``
        # One thread: saves are written in the order asked for. Its worker thread ends when
        # the journal is collected (ThreadPoolExecutor's own rule), so nothing to close.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="journal-writer")
        self._owner: tuple[str, int] | None = None  # (name, fd holding its flock)

    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    async def create(
        self, kind: str, source: str, params: dict[str, Any], job_id: str | None = None
    ) -> JobRecord:
        """A new PENDING record, saved, owned by this process; ``job_id`` lets a caller (the
        daemon) name the job before it starts, else one is made from the time."""
        job_id = job_id or new_job_id()
        owner = await asyncio.to_thread(self.owner)
        record = JobRecord(job_id=job_id, kind=kind, source=source, params=params, owner=owner)
        await self.save(record)
        return record

    def owner(self) -> str:
        """This process's owner name, its lock taken on first use (blocking). Raises
        ``StoreWriteError`` naming the file when it cannot be made."""
        if self._owner is None:
            directory = self.dir / OWNERS
            name = f"{os.getpid()}-{secrets.token_hex(4)}"
            temporary = directory / f".{name}.tmp"
            try:
                directory.mkdir(exist_ok=True)
                fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rename(temporary, directory / name)
                except BaseException:
                    os.close(fd)
                    temporary.unlink(missing_ok=True)
                    raise
            except OSError as e:
                raise write_failure(self.dir, f"job journal owner lock {name}", e) from e
            self._owner = (name, fd)
        return self._owner[0]

    def release_owner(self) -> None:
        """Drop this process's owner lock, as its exit would: its unfinished records become
        another's to recover. For tests; a process that runs jobs keeps it to the end."""
        if self._owner is not None:
            os.close(self._owner[1])
            self._owner = None

    def alive(self, record: JobRecord) -> bool:
        """Whether the process that owns ``record`` still runs (blocking): it is this one,
        or another holds the owner's lock. False for a record without an owner."""
        if not record.owner:
            return False
        if self._owner is not None and record.owner == self._owner[0]:
            return True
        try:
            fd = os.open(self.dir / OWNERS / record.owner, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops a lock taken just now
        return False

    def lock_recovery(self) -> int:
        """Take the recovery lock (blocking; ``unlock_recovery`` gives it back): held while
        unfinished records are recovered, one process at a time, so no two clean up the
        same dead job."""
        fd = os.open(self.dir / RECOVERY_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def unlock_recovery(fd: int) -> None:
        os.close(fd)  # closing drops the flock

    def queue_save(self, record: JobRecord) -> "asyncio.Future[None]":
        """Serialize the record now and queue its write on the writer thread; the future is
        done when the record is durable, or raises ``StoreWriteError`` naming the file (the
        old record stays as it was). Await it through ``asyncio.shield``: cancelling it
        would drop a write not yet begun. Call it from the event loop."""
        record.updated = _now()
        doc = asdict(record) | {"state": record.state.value}
        data = json.dumps(doc, indent=1).encode()
        path = self._path(record.job_id)
        written = asyncio.get_running_loop().run_in_executor(self._writer, self._write, path, data)
        # A caller cancelled while it waited no longer looks at the outcome.
        written.add_done_callback(lambda f: f.cancelled() or f.exception())
        return written

    def _write(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data, "journal")
        except OSError as e:
            raise write_failure(self.dir, f"job journal {path.name}", e) from e

    async def save(self, record: JobRecord) -> None:
        """Rewrite the record atomically, off the event loop; returns once it is durable.
        Raises ``StoreWriteError`` naming the file (the old record stays as it was). When
        the caller is cancelled meanwhile, the write still happens in its turn."""
        await asyncio.shield(self.queue_save(record))

    async def save_summary(self, record: JobRecord) -> None:
        """Save a finished job's summary. The outcome is decided by then (a snapshot may
        be committed): a failure to write costs a warning on the record, never the job —
        the journal keeps its last state and the next open's recovery ends it."""
        try:
            await self.save(record)
        except StoreWriteError as e:
            record.warnings.append(f"journal: summary not saved: {e}")
            log.warning("job.journal_failed", job=record.job_id, state="summary", error=str(e))

    def load(self, job_id: str) -> JobRecord:
        doc = json.loads(self._path(job_id).read_bytes())
        doc["state"] = State(doc["state"])
        return JobRecord(**doc)

    def records(self) -> list[JobRecord]:
        """Every readable record, oldest first. A record that cannot be read (damaged on
        disk) is moved aside to ``<job>.json.damaged`` and named in ``damaged`` — one bad
        file must not stop recovery of the others, nor every later start."""
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(self.load(path.stem))
            except (OSError, ValueError, TypeError, KeyError) as e:
                self.damaged.append(self._set_aside(path, e))
        return out

    def _set_aside(self, path: Path, error: BaseException) -> str:
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        try:
            os.replace(path, aside)
        except OSError as e:
            line = f"journal record {path} is unreadable ({error}) and could not be moved: {e}"
        else:
            line = f"journal record {path.name} is unreadable ({error}): moved aside to {aside}"
        log.warning("journal.damaged", path=str(path), error=str(error))
        return line

    def unfinished(self) -> list[JobRecord]:
        """Every readable record not finished whose owner is dead (blocking, as
        ``records``): what recovery must end. A live owner's jobs are its own."""
        return [r for r in self.records() if not r.finished and not self.alive(r)]

    def prune(self) -> None:
        """Delete the oldest finished records beyond ``KEEP_FINISHED``, and the lock files of
        dead owners (blocking; call it with no save pending, as recovery does)."""
        finished = [r for r in self.records() if r.finished]
        for record in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self._path(record.job_id).unlink(missing_ok=True)
        ours = self._owner[0] if self._owner is not None else None
        for path in (self.dir / OWNERS).glob("[!.]*"):
            if path.name == ours:
                continue
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while it lives
                    path.unlink()
                finally:
                    os.close(fd)
