"""The daemon's links to other sites: the replication receiver, pushes, pulls, standby.

- ``start_peer_server``: ``peer_server`` in the config → the receiver (mutual TLS) beside the
  API; each committed replica calls ``replica_committed``, each pull request
  ``pull_requested``.
- ``start_replication``: one snapshot pushed to one peer as a ``replicate`` job (the
  policy's push targets after each backup; a peer's pull).
- ``pull``: a pull policy's run asks its peers to push to us.
- ``start_standby``: a ``standby`` job refreshing the cold-standby VM of a replicated VM.
"""

from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import structlog

from engine.app.replicate import ReplicateRequest, replicate
from engine.app.standby import StandbyRequest, refresh
from engine.app.summaries import replication_doc, standby_doc
from engine.config.models import PeerServerSection
from engine.config.policy import Policy
from engine.daemon.context import DaemonContext
from engine.daemon.jobs import Busy, JobView
from engine.replication.receiver import PeerServer, build_peer_app
from engine.replication.sender import PeerTarget, ReplicationStats, request_pull
from engine.replication.tls import server_context
from engine.store.catalog import CatalogEntry
from engine.store.manifest import Manifest

log = structlog.get_logger("tessera.daemon")


async def start_peer_server(ctx: DaemonContext, section: PeerServerSection) -> PeerServer:
    """Receive replicas from peers (mutual TLS) into the section's store."""
    handle = ctx.store(section.store)
    host, _, port = section.listen.rpartition(":")
    app = build_peer_app(
        handle.store,
        on_commit=partial(replica_committed, ctx),
        on_pull=partial(pull_requested, ctx),
    )
    context = server_context(section.cert_file, section.key_file, section.ca_file)
    server = PeerServer(app, host.strip("[]"), int(port), context)
    await server.start()
    log.info("peers.listening", listen=section.listen, store=handle.name)
    return server


def replica_committed(ctx: DaemonContext, manifest: Manifest, sender: str | None) -> None:
    """A peer committed a snapshot here: refresh the standby of every policy that keeps
    one of that VM for that peer."""
    for policy in ctx.policies:
        standby = policy.standby
        if standby is None or not policy.enabled or standby.peer != sender:
            continue
        if not policy.selection.selects_vm(manifest.vm_name):
            continue
        try:
            start_standby(ctx, policy, manifest.vm_id, manifest.vm_name, manifest.snapshot_id)
        except Busy:
            log.info("standby.busy", vm=manifest.vm_name, snapshot=manifest.snapshot_id)


def pull_requested(ctx: DaemonContext, peer: str, patterns: tuple[str, ...]) -> list[str]:
    """A peer asks for the newest snapshot of the VMs matching ``patterns``: push each to
    it (a peer of this config only: its URL and our client certificate are there)."""
    ctx.config.peer(peer)  # ConfigError: the receiver answers 409 naming it
    handle = ctx.store(ctx.config.peer_server.store if ctx.config.peer_server else None)
    latest: dict[str, CatalogEntry] = {}
    for entry in handle.store.snapshots():
        if any(fnmatchcase(entry.vm_name, p) for p in patterns):
            latest[entry.vm_name] = entry  # entries are ordered by time within a VM
    jobs = []
    for vm, entry in sorted(latest.items()):
        try:
            jobs.append(start_replication(ctx, None, vm, entry.snapshot_id, peer).job_id)
        except Busy as e:
            log.info("pull.busy", peer=peer, vm=vm, job=str(e))
    log.info("pull.requested", peer=peer, vms=sorted(latest), jobs=jobs)
    return jobs


async def pull(ctx: DaemonContext, policy: Policy, patterns: list[str]) -> None:
    """A pull policy's run: ask each pull peer to push the newest snapshots of the VMs
    its selection names (the standby refresh follows each replica's commit here)."""
    for target in policy.replication:
        if target.mode != "pull":
            continue
        peer = PeerTarget.from_section(ctx.config.peer(target.peer))
        jobs = await request_pull(peer, patterns)
        log.info("pull.started", policy=policy.name, peer=target.peer, jobs=jobs)


def start_standby(
    ctx: DaemonContext, policy: Policy, vm_id: str, vm_name: str, snapshot_id: str | None = None
) -> JobView:
    """Refresh the cold-standby copy of one VM from the newest (or a given) snapshot."""
    standby = policy.standby
    assert standby is not None
    request = StandbyRequest(vm_id, standby, snapshot_id, policy.selection.engine)
    return submit_standby(ctx, request, vm_name, store=policy.store, policy=policy.name)


def submit_standby(
    ctx: DaemonContext,
    request: StandbyRequest,
    vm_name: str,
    *,
    store: str | None = None,
    policy: str | None = None,
) -> JobView:
    """A ``standby`` job for ``request`` (a policy's, or ``tessera standby refresh`` through
    the API). One at a time per VM: its key is ``standby:VM``, so a refresh asked for while
    one runs is refused (``Busy``), never run twice at once on the same standby VM."""
    handle = ctx.store(store)
    ctx.config.engine(request.engine)  # ConfigError now, not in the job
    snapshot_id = request.snapshot

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        outcome = await refresh(
            ctx.config, handle, request, job_id=view.job_id, progress=view.progress
        )
        view.outcome = outcome
        view.say(outcome.summary())
        view.error = outcome.restore.record.error if outcome.restore else None
        return ("succeeded" if outcome.ok else "failed"), standby_doc(outcome)

    params = {"store": handle.name, "snapshot": snapshot_id, "vm": vm_name}
    return ctx.jobs.submit("standby", f"standby:{vm_name}", body, policy=policy, params=params)


def start_replication(
    ctx: DaemonContext, policy: Policy | None, vm: str, snapshot_id: str, peer: str
) -> JobView:
    """Push one snapshot to a peer (only the chunks it lacks)."""
    handle = ctx.store(policy.store if policy else None)
    request = ReplicateRequest(PeerTarget.from_section(ctx.config.peer(peer)), snapshot_id)

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        def progress(stats: ReplicationStats) -> None:
            view.progress(f"to {peer}", stats.record_bytes_sent, max(stats.lacked_bytes, 1))

        outcome = await replicate(
            handle.store, request, progress=progress, job_id=view.job_id
        )  # its own journal: STORE/replication/journal
        view.outcome = outcome
        view.say(outcome.summary())
        view.error = outcome.record.error
        return outcome.record.state.value.lower(), replication_doc(outcome)

    params = {"store": handle.name, "snapshot": snapshot_id, "peer": peer}
    return ctx.jobs.submit(
        "replicate",
        f"replicate:{vm}:{peer}",
        body,
        policy=policy.name if policy else None,
        params=params,
    )
