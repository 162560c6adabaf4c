"""One disk of a restore point served over NBD: what ``tessera export`` runs in its own process
and the daemon runs as an ``export`` job (``engine.daemon.exports``), written once.

::

    resolve_export(store, SNAPSHOT, DISK) ─► ExportTarget (snapshot id, manifest, one disk)
    serve_export(store, pool, target, listeners, overlay=FILE?)
        SnapshotExport ─► Overlay (when FILE) ─► engine.io.nbd.serve until cancelled

The caller holds the snapshot (``store.reading_snapshot``) while ``serve_export`` runs and
owns the store and the CPU pool. ``serve_export`` returns only by cancellation (or raises
OSError when a listener cannot be opened); its ``ready`` future gets the addresses once
clients can connect, and ``stats`` counts connections and bytes.
"""

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import ConfigError, SnapshotNotFound
from engine.io.nbd.serve import Backend, Listener, ServerStats, serve
from engine.io.nbd.server import ExportSpec
from engine.jobs.restore import select_disks
from engine.restore.export import SnapshotExport
from engine.restore.overlay import Overlay
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.workers.pool import CpuPool


@dataclass(frozen=True)
class ExportTarget:
    """The disk an export serves."""

    snapshot_id: str
    manifest: Manifest
    disk: DiskEntry


def resolve_export(store: Store, snapshot: str, disk: str | None) -> ExportTarget:
    """``snapshot`` (id or unique prefix) and ``disk`` (id or name; None: the only one) of
    ``store`` (blocking). ConfigError naming the snapshot's disks when ``disk`` is needed or
    unknown; SnapshotNotFound for an unknown snapshot."""
    snapshot_id = store.resolve(snapshot)
    manifest = store.manifest(snapshot_id)
    try:
        disks = select_disks(manifest, disk)
    except SnapshotNotFound as e:
        raise ConfigError(message=f"export: {e}") from None
    if len(disks) > 1:
        names = ", ".join(f"{d.name} ({d.disk_id})" for d in disks)
        raise ConfigError(
            message=f"export: snapshot {snapshot_id} has {len(disks)} disks ({names}); "
            "choose one (--disk, or disk in the request)"
        )
    return ExportTarget(snapshot_id, manifest, disks[0])


def export_spec(target: ExportTarget, writable: bool) -> ExportSpec:
    manifest, disk = target.manifest, target.disk
    return ExportSpec(
        name=disk.name,
        size=disk.size,
        read_only=not writable,
        description=f"disk {disk.disk_id} of {manifest.vm_name}, snapshot {manifest.snapshot_id}",
        preferred_block=manifest.chunk_size,
        # One process serves every connection from one cache (and one overlay, whose
        # writes are serialised), so all connections see the same disk.
        multi_conn=not writable,
    )


def uris(addresses: Sequence[str], *, tls: bool = False) -> list[str]:
    """NBD URIs (libnbd, qemu) of ``serve``'s addresses (the default export "" is the disk:
    no name); ``nbds`` when clients must speak TLS."""
    scheme = "nbds" if tls else "nbd"
    out = []
    for address in addresses:
        if address.startswith("unix:"):
            out.append(f"{scheme}+unix:///?socket={address.removeprefix('unix:')}")
        else:
            out.append(f"{scheme}://{address}/")
    return out


async def serve_export(
    store: Store,
    pool: CpuPool,
    target: ExportTarget,
    listeners: Sequence[Listener],
    *,
    overlay: Path | None = None,
    ready: "asyncio.Future[list[str]] | None" = None,
    stats: ServerStats | None = None,
) -> None:
    """Serve ``target`` on ``listeners`` until cancelled (module docstring); with ``overlay``
    writable, its writes in that sparse file (and ``FILE.tessera-map``), flushed and closed
    at the end; the store never changes."""
    manifest, disk = target.manifest, target.disk
    spec = export_spec(target, overlay is not None)
    async with SnapshotExport.open(store, pool, manifest, disk) as export:
        backend: Backend = export
        cow: Overlay | None = None
        if overlay is not None:
            cow = Overlay.open(
                export, overlay, snapshot=manifest.snapshot_id, disk=disk.disk_id, size=disk.size
            )
            backend = cow
        try:
            await serve(backend, spec, listeners, ready=ready, stats=stats)
        finally:
            if cow is not None:
                with contextlib.suppress(OSError):
                    await cow.flush()
                cow.close()
