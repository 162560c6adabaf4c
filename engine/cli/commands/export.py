"""What ``tessera export`` runs (its options: ``engine.cli.export``): the store opened
read-only (so it serves beside the daemon, which holds the writer lock), the snapshot
share-locked while served (prune skips it), one disk as an NBD export until SIGINT or
SIGTERM. Prints the NBD URI(s) once clients can connect (``nbds://`` when clients must
speak TLS)."""

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys

from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_OK
from engine.core.errors import ConfigError, SnapshotNotFound
from engine.core.units import human_bytes
from engine.io.nbd.serve import Backend, Listener, ServerStats, serve
from engine.io.nbd.server import ExportSpec
from engine.io.nbd.tls import ServerTls
from engine.jobs.restore import select_disks
from engine.restore.export import SnapshotExport
from engine.restore.overlay import Overlay
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.util import aio
from engine.workers import make_cpu_pool


def cmd_export(args: argparse.Namespace) -> int:
    tls = tls_files(args)  # before the store is opened: a refusal costs nothing
    if tls is not None:
        tls.context()  # unreadable or mismatched files fail here, before anything is served
    with open_store(args, writable=False) as store:
        try:
            snapshot_id = store.resolve(args.snapshot)
            manifest = store.manifest(snapshot_id)
            disks = select_disks(manifest, args.disk)
        except SnapshotNotFound as e:
            raise ConfigError(message=f"export: {e}") from None
        if len(disks) > 1:
            names = ", ".join(f"{d.name} ({d.disk_id})" for d in disks)
            raise ConfigError(
                message=f"export: snapshot {snapshot_id} has {len(disks)} disks ({names}); "
                "choose one with --disk"
            )
        with store.reading_snapshot(snapshot_id):
            return aio.run(_serve(args, store, manifest, disks[0], tls))


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address; any other name counts as the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_files(args: argparse.Namespace) -> ServerTls | None:
    """The TLS files the options name, None without TLS; ConfigError when they do not fit
    together or TCP would be served in clear to the network without ``--no-tls``."""
    if args.tls_dir is not None:
        if args.tls_key is not None or args.tls_ca is not None:
            raise ConfigError(message="export: --tls-dir holds the key and the CA already")
        tls: ServerTls | None = ServerTls.from_dir(args.tls_dir)
    elif args.tls_cert is not None or args.tls_key is not None:
        if args.tls_cert is None or args.tls_key is None:
            raise ConfigError(message="export: --tls-cert and --tls-key go together")
        tls = ServerTls(args.tls_cert, args.tls_key, args.tls_ca)
    elif args.tls_ca is not None:
        raise ConfigError(message="export: --tls-ca needs --tls-cert and --tls-key")
    else:
        tls = None
    if tls is None and not args.no_tls and args.listen is not None:
        host = args.listen[0]
        if not is_loopback(host):
            raise ConfigError(
                message=f"export: {host} is not a loopback address and the export would be "
                "served in clear; give --tls-dir DIR (or --tls-cert and --tls-key), or "
                "--no-tls if the network is trusted"
            )
    return tls


def uris(addresses: list[str], name: str, tls: bool = False) -> list[str]:
    """The NBD URIs (libnbd, qemu) of the export at ``addresses``."""
    del name  # the default export ("") is this disk: URIs need no name
    scheme = "nbds" if tls else "nbd"
    out = []
    for address in addresses:
        if address.startswith("unix:"):
            out.append(f"{scheme}+unix:///?socket={address.removeprefix('unix:')}")
        else:
            out.append(f"{scheme}://{address}/")
    return out


async def _serve(
    args: argparse.Namespace,
    store: Store,
    manifest: Manifest,
    disk: DiskEntry,
    tls: ServerTls | None,
) -> int:
    if args.socket is not None:
        listener = Listener(path=args.socket, tls=tls)
    else:
        host, port = args.listen
        listener = Listener(host=host, port=port, tls=tls)
    writable = args.writable_overlay is not None
    spec = ExportSpec(
        name=disk.name,
        size=disk.size,
        read_only=not writable,
        description=f"disk {disk.disk_id} of {manifest.vm_name}, snapshot {manifest.snapshot_id}",
        preferred_block=manifest.chunk_size,
        # One process serves every connection from one cache (and one overlay, whose
        # writes are serialised), so all connections see the same disk.
        multi_conn=not writable,
    )
    pool = make_cpu_pool(store.keys, manifest.chunk_size)
    stats = ServerStats()
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopping = []

    def stop(signame: str) -> None:
        stopping.append(signame)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)
    overlay: Overlay | None = None
    try:
        async with SnapshotExport.open(store, pool, manifest, disk) as export:
            backend: Backend = export
            if writable:
                overlay = Overlay.open(
                    export,
                    args.writable_overlay,
                    snapshot=manifest.snapshot_id,
                    disk=disk.disk_id,
                    size=disk.size,
                )
                backend = overlay
            ready: asyncio.Future[list[str]] = loop.create_future()
            ready.add_done_callback(
                lambda f: _announce(f.result(), spec, manifest, disk, writable, tls)
            )
            try:
                await serve(backend, spec, [listener], ready=ready, stats=stats)
            except asyncio.CancelledError:
                if not stopping:
                    raise
                task.uncancel()
    finally:
        if overlay is not None:
            with contextlib.suppress(OSError):
                await overlay.flush()
            overlay.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await pool.aclose()
    print(
        f"export stopped ({stopping[0]}): {stats.connections} connections, "
        f"{human_bytes(stats.bytes_read)} read, {human_bytes(stats.bytes_written)} written",
        file=sys.stderr,
    )
    return EXIT_OK


def _announce(
    addresses: list[str],
    spec: ExportSpec,
    manifest: Manifest,
    disk: DiskEntry,
    writable: bool,
    tls: ServerTls | None,
) -> None:
    mode = "writable (overlay)" if writable else "read-only"
    if tls is not None:
        mode += ", TLS" + (" with client certificates" if tls.mutual else "")
    print(
        f"serving disk {disk.name} ({disk.disk_id}, {human_bytes(disk.size)}) of "
        f"{manifest.vm_name} snapshot {manifest.snapshot_id}, {mode}",
        file=sys.stderr,
    )
    for uri in uris(addresses, spec.name, tls is not None):
        print(uri, flush=True)
