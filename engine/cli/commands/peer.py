"""What ``tessera peer init-ca|issue|init-store|serve`` and ``tessera replicate`` run (their
options: ``engine.cli.peer``)."""

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from engine.app.passphrase import resolve_passphrase
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.config.loader import load as load_config
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.jobs.states import State
from engine.store.chunk_store import Store
from engine.store.keys import StoreKeys
from engine.store.layout import ENCRYPTION_NONE
from engine.util import aio

if TYPE_CHECKING:
    from engine.replication.sender import PeerTarget, ReplicationStats

# The replication machinery (aiohttp, TLS) is imported by the commands that use it: a local
# command loads no HTTP code.


def cmd_init_ca(args: argparse.Namespace) -> int:
    from engine.replication import tls  # noqa: PLC0415

    cert = tls.init_ca(args.dir, args.name)
    print(f"created CA {cert} and {args.dir / tls.CA_KEY} (keep the key offline)")
    return EXIT_OK


def cmd_issue(args: argparse.Namespace) -> int:
    from engine.replication import tls  # noqa: PLC0415

    files = tls.issue(args.ca_dir, args.name, args.out, args.dns or None, args.ip)
    host = (args.dns or args.ip or [args.name])[0]
    host = f"[{host}]" if ":" in host else host
    print(f"issued {files.cert} and {files.key} for {args.name} (CA copy: {files.ca})")
    print(
        f"""
# On {args.name} as a receiver: serve its replica store
tessera peer serve --store STORE --listen 0.0.0.0:{args.port} \\
    --cert {files.cert} --key {files.key} --ca {files.ca}

# On a sending site (its own certificate from `peer issue`), daemon configuration:
peers:
  - name: {args.name}
    url: https://{host}:{args.port}
    cert_file: SENDER.crt        # the sending site's certificate and key
    key_file: SENDER.key
    ca_file: {files.ca}
    streams: 4
    # bandwidth_limit: 50MiB

# {args.name} as the sending site, in its daemon configuration, for a peer named OTHER:
#   cert_file: {files.cert}
#   key_file: {files.key}
#   ca_file: {files.ca}"""
    )
    return EXIT_OK


def cmd_init_store(args: argparse.Namespace) -> int:
    with open_store(args, False) as origin:
        keys, config = origin.keys, origin.config
    if args.encrypted_only:
        if keys.data_key is None:
            raise ConfigError(message=f"store {args.store} keeps no data key to leave out")
        keys = StoreKeys(id_key=keys.id_key, mac_key=keys.mac_key, data_key=None)
    passphrase = None
    if keys.data_key is not None and config.encryption != ENCRYPTION_NONE:
        passphrase = resolve_passphrase(args.passphrase_file, confirm=True)
    Store.init(
        args.path,
        chunk_size=config.chunk_size,
        encryption=config.encryption,
        pack_size=config.pack_size,
        passphrase=passphrase,
        keys=keys,
    )
    kind = "encrypted-only replica" if args.encrypted_only else "replica"
    print(f"created {kind} {args.path} of {args.store} (shared keys, chunk size same)")
    if args.encrypted_only:
        print("  it holds no data key: it cannot read or restore what it stores")
    return EXIT_OK


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(message=f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.replication import tls  # noqa: PLC0415

    host, port = _listen(args.listen)
    context = tls.server_context(args.cert, args.key, args.ca)
    with open_store(args, True) as store:
        aio.run(_serve(store, host, port, context))
    return EXIT_OK


async def _serve(store: Store, host: str, port: int, context: object) -> None:
    import ssl  # noqa: PLC0415 - typing only

    from engine.replication.receiver import PeerServer, build_peer_app  # noqa: PLC0415

    assert isinstance(context, ssl.SSLContext)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with PeerServer(build_peer_app(store), host, port, context) as server:
            print(f"receiving for {store.path} on https://{host}:{server.port}", flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _target(args: argparse.Namespace) -> "PeerTarget":
    from engine.replication import tls  # noqa: PLC0415
    from engine.replication.sender import PeerTarget  # noqa: PLC0415

    if args.config is not None:
        if not args.peer:
            raise ConfigError(message="replicate --config needs --peer NAME")
        section = load_config(args.config, args.config.parent / "conf.d").peer(args.peer)
        target = PeerTarget.from_section(section)
    else:
        if not (args.peer_url and args.cert and args.key and args.ca):
            raise ConfigError(
                message="replicate: give --peer-url, --cert, --key and --ca (or --config --peer)"
            )
        url = urlsplit(args.peer_url)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(message=f"--peer-url must be https://HOST:PORT, got {args.peer_url}")
        name = args.peer or f"{url.hostname}-{url.port or 443}".replace(":", "-")
        target = PeerTarget(
            name=name, url=args.peer_url, ssl=tls.client_context(args.cert, args.key, args.ca)
        )
    streams = args.streams or target.streams
    bwlimit = args.bwlimit or target.bandwidth_limit
    return PeerTarget(target.name, target.url, target.ssl, streams, bwlimit)


def cmd_replicate(args: argparse.Namespace) -> int:
    if (args.snapshot is None) == (args.vm is None):
        raise ConfigError(message="replicate: give SNAPSHOT_ID or --vm VM (one of them)")
    from engine.app.replicate import ReplicateRequest, replicate  # noqa: PLC0415

    request = ReplicateRequest(_target(args), args.snapshot, args.vm, args.full)

    def progress(stats: "ReplicationStats") -> None:
        if sys.stderr.isatty():
            print(
                f"\r  sent {stats.chunks_sent}/{stats.lacked} chunks, "
                f"{human_bytes(stats.record_bytes_sent)}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    # Read-only: the sender only reads records, so it runs beside a daemon or a backup.
    with open_store(args, False) as store:
        outcome = aio.run(replicate(store, request, progress=progress))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(outcome.summary())
    return EXIT_OK if outcome.record.state is State.SUCCEEDED else EXIT_FAILED
