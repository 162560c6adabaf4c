"""What ``tessera export`` runs (its options: ``engine.cli.export``).

Two ways, chosen as ``backup vm`` and ``restore --config`` choose: given ``--config`` and a
daemon answering on that configuration's socket, the export is a daemon job (``POST
/v1/exports``): the daemon serves it on a socket of its own, this command prints the job id
and the NBD URI and returns; the export runs until ``tessera cancel JOB`` or its ``--ttl``.
Otherwise (``--store PATH``, or ``--config`` with no daemon, or ``--direct``) it runs here:
the store opened read-only (so it serves beside the daemon, which holds the writer lock), the
snapshot share-locked while served (prune skips it), one disk as an NBD export on
``--socket``/``--listen`` until SIGINT or SIGTERM (``engine.app.export``). Prints the NBD
URI(s) once clients can connect (``nbds://`` when clients must speak TLS).
"""

import argparse
import asyncio
import ipaddress
import signal
import sys
from pathlib import Path

from engine.app.export import ExportTarget, resolve_export, serve_export
from engine.app.export import uris as export_uris
from engine.cli.commands import service as cli_service
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_OK
from engine.core.errors import ConfigError, SnapshotNotFound
from engine.core.units import human_bytes
from engine.io.nbd.serve import Listener, ServerStats
from engine.io.nbd.tls import ServerTls
from engine.store.chunk_store import Store
from engine.util import aio
from engine.workers import make_cpu_pool


def cmd_export(args: argparse.Namespace) -> int:
    if args.config is not None and not args.direct:
        socket = cli_service.daemon_socket(args.config)
        if socket is not None:
            if args.socket is not None or args.listen is not None or _tls_asked(args):
                raise ConfigError(
                    message="export: the daemon chooses the socket of its exports; drop "
                    "--socket/--listen and the TLS options, or give --direct to serve here"
                )
            return aio.run(_through_daemon(args, socket))
    if args.ttl is not None or args.writable or args.store_name is not None:
        raise ConfigError(
            message="export: --ttl, --writable and --store-name apply to an export by the daemon"
        )
    if args.socket is None and args.listen is None:
        raise ConfigError(message="export: give --socket PATH or --listen HOST:PORT")
    tls = tls_files(args)  # before the store is opened: a refusal costs nothing
    if tls is not None:
        tls.context()  # unreadable or mismatched files fail here, before anything is served
    with open_store(args, writable=False) as store:
        try:
            target = resolve_export(store, args.snapshot, args.disk)
        except SnapshotNotFound as e:
            raise ConfigError(message=f"export: {e}") from None
        with store.reading_snapshot(target.snapshot_id):
            return aio.run(_serve(args, store, target, tls))


def _tls_asked(args: argparse.Namespace) -> bool:
    return any(
        x is not None for x in (args.tls_dir, args.tls_cert, args.tls_key, args.tls_ca)
    ) or bool(args.no_tls)


async def _through_daemon(args: argparse.Namespace, socket: Path) -> int:
    if args.writable_overlay is not None:
        raise ConfigError(
            message="export: the daemon keeps the overlay of its exports; give --writable "
            "instead of --writable-overlay (or --direct to serve here)"
        )
    body: dict[str, object] = {"snapshot": args.snapshot, "disk": args.disk}
    body |= {"writable_overlay": args.writable, "store": args.store_name}
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl.delta.total_seconds()
    async with cli_service.client(socket) as client:
        doc = await client.request("POST", "/v1/exports", body)
    export = doc["export"]
    print(
        f"job {export['job']} serves disk {export['disk']['name']} of snapshot "
        f"{export['snapshot']} in the daemon ({'writable' if export['writable'] else 'read-only'}"
        f"; stop it with `tessera cancel {export['job']}`)",
        file=sys.stderr,
    )
    print(export["uri"], flush=True)
    return EXIT_OK


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
    return export_uris(addresses, tls=tls)


async def _serve(
    args: argparse.Namespace, store: Store, target: ExportTarget, tls: ServerTls | None
) -> int:
    if args.socket is not None:
        listener = Listener(path=args.socket, tls=tls)
    else:
        host, port = args.listen
        listener = Listener(host=host, port=port, tls=tls)
    overlay = args.writable_overlay
    pool = make_cpu_pool(store.keys, target.manifest.chunk_size)
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
    ready: asyncio.Future[list[str]] = loop.create_future()
    ready.add_done_callback(lambda f: _announce(f.result(), target, overlay is not None, tls))
    try:
        await serve_export(
            store, pool, target, [listener], overlay=overlay, ready=ready, stats=stats
        )
    except asyncio.CancelledError:
        if not stopping:
            raise
        task.uncancel()
    finally:
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
    addresses: list[str], target: ExportTarget, writable: bool, tls: ServerTls | None
) -> None:
    manifest, disk = target.manifest, target.disk
    mode = "writable (overlay)" if writable else "read-only"
    if tls is not None:
        mode += ", TLS" + (" with client certificates" if tls.mutual else "")
    print(
        f"serving disk {disk.name} ({disk.disk_id}, {human_bytes(disk.size)}) of "
        f"{manifest.vm_name} snapshot {manifest.snapshot_id}, {mode}",
        file=sys.stderr,
    )
    for uri in uris(addresses, disk.name, tls is not None):
        print(uri, flush=True)
