"""Replication, from a typed request to a typed outcome: the one path for ``tessera
replicate`` and for the daemon's ``replicate`` jobs (a policy's push, a peer's pull).

::

    ReplicateRequest(peer, snapshot | vm, full)
        → replicate(store, request, progress=…, job_id=…)
              the snapshot: an id or prefix (``Store.resolve``), or the VM's newest
              → ``engine.replication.job.run_replication`` (its own journal, STORE/replication)
        → ``ReplicationOutcome`` (its record says SUCCEEDED / FAILED / CANCELLED)

The sender only reads records, so the store may be open read-only (the command line) or be
the daemon's writer; either way a replication runs beside backups.
"""

from dataclasses import dataclass

from engine.core.errors import ConfigError
from engine.replication.job import ReplicationOutcome, latest_snapshot, run_replication
from engine.replication.sender import PeerTarget, Progress, SendingStore


@dataclass(frozen=True, slots=True)
class ReplicateRequest:
    """Push one snapshot (``snapshot``: id or prefix) or a VM's newest (``vm``: name or
    id) to ``peer``; ``full`` offers every chunk id (the per-peer state is ignored)."""

    peer: PeerTarget
    snapshot: str | None = None
    vm: str | None = None
    full: bool = False

    def check(self) -> None:
        if (self.snapshot is None) == (self.vm is None):
            raise ConfigError(message="replicate: give a snapshot or a VM (one of them)")


async def replicate(
    store: SendingStore,
    request: ReplicateRequest,
    *,
    progress: Progress | None = None,
    job_id: str | None = None,
) -> ReplicationOutcome:
    """Run ``request``; raises ``SnapshotNotFound`` before any job starts for an unknown
    snapshot or a VM without one, ``ConfigError`` for a request naming neither."""
    request.check()
    snapshot_id = (
        store.resolve(request.snapshot)
        if request.snapshot is not None
        else latest_snapshot(store, request.vm or "")
    )
    return await run_replication(
        store=store,
        snapshot_id=snapshot_id,
        target=request.peer,
        progress=progress,
        job_id=job_id,
        full=request.full,
    )
