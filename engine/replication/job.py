"""The replicate job: one snapshot pushed to one peer, as a state machine like backups.

PREPARING    resolve the snapshot, share-lock it (and the diff base: the last snapshot of
             the VM replicated to this peer, from ``PeerState``), open a receiver session
TRANSFERRING offer → lacking → records over N streams (``Sender.transfer``); skipped when
             the receiver already holds the snapshot
COMMITTING   DiskMaps, then the manifest (the receiver's commit point); per-peer state saved
FINISHING / ABORTING / CANCELLING   the receiver session is closed (aborted unless
             committed: the receiver drops what it staged, keeps the records — GC's call)

A receiver that no longer holds the base's chunks refuses the commit (chunks missing):
the transfer runs once more without a base (every id offered), then commits.
Summary: offered, lacked, sent, skipped, record bytes vs body bytes on the wire, seconds.
"""

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Final

from engine.core.errors import SnapshotNotFound
from engine.core.units import human_bytes, human_rate
from engine.jobs.driver import JobDriver
from engine.jobs.journal import JobRecord, Journal
from engine.jobs.states import CLEANUP, Event, State
from engine.replication import protocol as proto
from engine.replication.sender import (
    DEFAULT_RETRY,
    PeerTarget,
    Progress,
    ReplicationStats,
    Sender,
    SendingStore,
    check_diskmaps,
)
from engine.replication.state import PeerState, check_peer_name, state_dir
from engine.store.manifest import Manifest
from engine.store.protocols import ChunkReader
from engine.util.retry import RetryPolicy

JOB_KIND: Final = "replicate"
JOB_SOURCE: Final = "replication"
CLOSE_TIMEOUT: Final = 30.0  # seconds to tell the receiver a session is over
MAX_REOPEN: Final = 3  # sessions lost in one job (receiver restarts) before it fails


@dataclass
class ReplicationOutcome:
    record: JobRecord
    peer: str
    manifest: Manifest | None = None
    base: str | None = None
    already_there: bool = False
    stats: ReplicationStats = field(default_factory=ReplicationStats)
    seconds: float = 0.0

    @property
    def wire_ratio(self) -> float:
        """Body bytes on the wire per byte of records the receiver lacked."""
        s = self.stats
        return s.body_bytes / s.lacked_bytes if s.lacked_bytes else 0.0

    def summary(self) -> str:
        s = self.stats
        rate = s.record_bytes_sent / self.seconds if self.seconds else 0.0
        return (
            f"replicate {self.record.job_id} {self.record.state.value}: snapshot "
            f"{self.record.params.get('snapshot')} → {self.peer}"
            + (f" (diff vs {self.base})" if self.base else " (full)")
            + (", already there" if self.already_there else "")
            + f": offered {s.offered}, lacked {s.lacked} ({human_bytes(s.lacked_bytes)}), "
            f"sent {s.chunks_sent} ({human_bytes(s.record_bytes_sent)}), skipped "
            f"{s.chunks_skipped}, on the wire {human_bytes(s.body_bytes)} "
            f"(x{self.wire_ratio:.3f}), {s.retries} retries, {self.seconds:.2f} s, "
            f"{human_rate(rate)}" + (f"; error: {self.record.error}" if self.record.error else "")
        )


async def default_journal(store: SendingStore) -> Journal:
    """A sender's own journal (``STORE/replication/journal``): a sender may run beside the
    process holding the writer lock, whose recovery must not judge its live records.
    Records a dead process left unfinished (``Journal.unfinished``: their owner's lock is
    free; a record from before owners, by its pid) are marked FAILED (nothing to undo on
    this side: the receiver drops an uncommitted session's staged files when it expires)."""
    journal = Journal(state_dir(store.path) / "journal")
    for record in await asyncio.to_thread(journal.unfinished):
        if record.kind == JOB_KIND and (record.owner or not _alive(record.pid)):
            driver = JobDriver(journal, record)
            record.error = record.error or f"interrupted: process {record.pid} died"
            if record.state is State.PENDING:
                await driver.transition(Event.CANCEL)
                continue
            if record.state not in CLEANUP:
                await driver.transition(Event.ERROR)
            await driver.transition(Event.CLEANED)
    return journal


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


class _Replicate:
    """The steps of one replicate job (``run_replication`` drives them)."""

    def __init__(
        self,
        store: SendingStore,
        snapshot_id: str,
        sender: Sender,
        outcome: ReplicationOutcome,
        journal: Journal,
        full: bool,
    ):
        self.store = store
        self.snapshot_id = snapshot_id
        self.sender = sender
        self.outcome = outcome
        self.journal = journal
        self.full = full
        self.state = PeerState.load(store.path, sender.target.name)
        self.base: Manifest | None = None
        self.held = AsyncExitStack()

    async def prepare(self) -> Event:
        store, outcome, held = self.store, self.outcome, self.held
        held.enter_context(store.reading_snapshot(self.snapshot_id))  # prune skips it
        manifest = outcome.manifest = await asyncio.to_thread(store.manifest, self.snapshot_id)
        await asyncio.to_thread(check_diskmaps, store, manifest)
        last = None if self.full else self.state.last(manifest.vm_id)
        if last is not None and last != self.snapshot_id:
            try:
                held.enter_context(store.reading_snapshot(last))
                self.base = await asyncio.to_thread(store.manifest, last)
            except SnapshotNotFound:
                self.base = None  # pruned here since: send in full
        await held.enter_async_context(self.sender)
        opened = await self.sender.open(manifest, self.base.snapshot_id if self.base else None)
        if not opened.base_held:
            self.base = None  # the receiver lost it (pruned there): every id is a candidate
        outcome.base = self.base.snapshot_id if self.base else None
        outcome.already_there = opened.committed
        outcome.record.resources["session"] = opened.session
        await self.journal.save(outcome.record)
        return Event.PREPARED

    async def transfer(self) -> Event:
        await self._in_session(self._send, resend=False)
        return Event.TRANSFERRED

    async def commit(self) -> Event:
        manifest = self.outcome.manifest
        assert manifest is not None
        await self._in_session(self._commit, resend=True)
        await asyncio.to_thread(
            self.state.replicated, manifest.vm_id, manifest.snapshot_id, manifest.time
        )
        return Event.COMMITTED

    async def _send(self) -> None:
        assert self.outcome.manifest is not None
        if not self.outcome.already_there:
            await self.sender.transfer(self.outcome.manifest, self.base)

    async def _commit(self) -> None:
        manifest = self.outcome.manifest
        assert manifest is not None
        if self.outcome.already_there:
            return
        try:
            await self.sender.commit(manifest)
        except proto.SessionLost:
            raise
        except proto.PeerError as e:
            if self.base is not None and "missing chunks" in str(e):
                # The receiver lacks chunks the base had: offer every id once more.
                self.base = self.outcome.base = None
                await self.sender.transfer(manifest, None)
                await self.sender.commit(manifest)
            elif not (await self.sender.open(manifest, None)).committed:
                raise
            # else: the commit went through and only its answer was lost

    async def _in_session(self, step: Callable[[], Awaitable[None]], resend: bool) -> None:
        """Run ``step``; when the receiver lost the session (restarted), open a new one and
        run it again (``resend``: send what it lacks first — its ``lacking`` answers skip
        what arrived; a lost session drops staged DiskMaps, never records)."""
        manifest = self.outcome.manifest
        assert manifest is not None
        for reopened in range(MAX_REOPEN + 1):
            try:
                await step()
            except proto.SessionLost as e:
                if reopened == MAX_REOPEN:
                    raise
                self.outcome.record.warnings.append(f"session lost, reopened: {e}")
                opened = await self.sender.open(manifest, self.outcome.base)
                if not opened.base_held:
                    self.base = self.outcome.base = None
                self.outcome.already_there = opened.committed
                if not opened.committed and resend:
                    await self.sender.transfer(manifest, self.base)
            else:
                return

    async def cleanup(self, success: bool) -> None:
        try:
            if self.sender.session_id is not None:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.sender.abort()
        finally:
            await self.held.aclose()


async def run_replication(
    *,
    store: SendingStore,
    snapshot_id: str,
    target: PeerTarget,
    journal: Journal | None = None,
    progress: Progress | None = None,
    job_id: str | None = None,
    retry_policy: RetryPolicy = DEFAULT_RETRY,
    batch_bytes: int = proto.RECORD_BATCH_BYTES,
    full: bool = False,
    sender_name: str = "tessera",
) -> ReplicationOutcome:
    """Push one committed snapshot of ``store`` to ``target``; the outcome's record says
    SUCCEEDED / FAILED / CANCELLED (cancellation is re-raised after cleanup). ``full``
    ignores the per-peer state (every id of the snapshot is offered)."""
    check_peer_name(target.name)
    journal = journal or await default_journal(store)
    params = {"snapshot": snapshot_id, "peer": target.name, "url": target.url}
    record = await journal.create(JOB_KIND, JOB_SOURCE, params, job_id)
    outcome = ReplicationOutcome(record, target.name)
    sender = Sender(
        store,
        target,
        progress=progress,
        retry_policy=retry_policy,
        batch_bytes=batch_bytes,
        sender_name=sender_name,
    )
    outcome.stats = sender.stats
    job = _Replicate(store, snapshot_id, sender, outcome, journal, full)
    started = time.perf_counter()
    try:
        await JobDriver(journal, record).run(
            {
                State.PREPARING: job.prepare,
                State.TRANSFERRING: job.transfer,
                State.COMMITTING: job.commit,
            },
            job.cleanup,
        )
    finally:
        await job.held.aclose()
        outcome.seconds = time.perf_counter() - started
        record.summary = outcome.stats.doc() | {
            "seconds": round(outcome.seconds, 3),
            "base": outcome.base,
            "already_there": outcome.already_there,
        }
        await journal.save_summary(record)
    return outcome


def latest_snapshot(store: ChunkReader, vm: str) -> str:
    """The newest committed snapshot of a VM (id or name); raises SnapshotNotFound."""
    entries = store.snapshots(vm)
    if not entries:
        raise SnapshotNotFound(snapshot=vm, reason="no snapshot of this VM")
    return entries[-1].snapshot_id
