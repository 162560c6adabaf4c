"""``tessera peer init-ca|issue|init-store|serve`` and ``tessera replicate``: their options.
What they run is ``engine.cli.commands.peer``.

Registered by ``engine.cli.main.build_parser`` through ``register``; the key options are
passed in so this module does not import ``engine.cli.main`` (which imports it).

Setting up two sites (A pushes to B)::

    tessera peer init-ca --dir ca/                          # once, kept offline
    tessera peer issue --ca-dir ca/ --name site-a --out a/ --dns a.example.org
    tessera peer issue --ca-dir ca/ --name site-b --out b/ --dns b.example.org
    tessera peer init-store /srv/replica --from-store /srv/store   # on B: shared keys
    tessera peer serve --store /srv/replica --listen 0.0.0.0:8444 --cert b/site-b.crt ...
    tessera replicate --vm web01 --store /srv/store --peer-url https://b.example.org:8444 \\
        --cert a/site-a.crt --key a/site-a.key --ca a/ca.crt
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli import args as cli_args
from engine.cli.commands import Handler

DEFAULT_PEER_PORT = 8444


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``peer`` (init-ca, issue, init-store, serve) and ``replicate`` to the parser."""
    peer = sub.add_parser("peer", help="sites: certificates, replica stores, the receiver")
    psub = peer.add_subparsers(dest="peer_command", required=True, metavar="ACTION")
    p = psub.add_parser("init-ca", help="create the CA that signs every site's certificate")
    p.add_argument("--dir", type=Path, required=True, help="directory for the CA (created)")
    p.add_argument("--name", default="Tessera peers CA", help="the CA's common name")
    p.set_defaults(func=Handler("peer", "cmd_init_ca"))

    p = psub.add_parser("issue", help="a site key and certificate signed by the CA")
    p.add_argument("--ca-dir", type=Path, required=True, help="the CA of peer init-ca")
    p.add_argument("--name", required=True, help="the site's name (certificate CN)")
    p.add_argument(
        "--out", type=Path, required=True, help="directory for the site's certificate and key"
    )
    p.add_argument("--dns", action="append", default=[], help="DNS name (SAN), repeatable")
    p.add_argument("--ip", action="append", default=[], help="IP address (SAN), repeatable")
    p.add_argument("--port", type=cli_args.port, default=DEFAULT_PEER_PORT, help="for the snippet")
    p.set_defaults(func=Handler("peer", "cmd_issue"))

    p = psub.add_parser("init-store", help="create a replica store sharing another's keys")
    p.add_argument("path", type=Path, metavar="PATH", help="the new store's directory")
    p.add_argument(
        "--from-store",
        type=Path,
        required=True,
        dest="store",
        help="the store that will replicate into it (its id, keys and chunk size are taken)",
    )
    p.add_argument(
        "--encrypted-only",
        action="store_true",
        help="keep no data key: the replica checks CRCs and stores records it cannot read",
    )
    add_key_options(p)
    p.set_defaults(func=Handler("peer", "cmd_init_store"))

    p = psub.add_parser("serve", help="receive replicated snapshots (mutual TLS)")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument(
        "--listen",
        default=f"0.0.0.0:{DEFAULT_PEER_PORT}",
        metavar="HOST:PORT",
        help="address to accept senders on (default %(default)s)",
    )
    _add_tls_options(p)
    add_key_options(p)
    p.set_defaults(func=Handler("peer", "cmd_serve"))

    p = sub.add_parser("replicate", help="push a snapshot to a peer (only what it lacks)")
    p.add_argument("snapshot", nargs="?", metavar="SNAPSHOT_ID", help="id or unique prefix")
    p.add_argument("--vm", help="the VM's newest snapshot (instead of SNAPSHOT_ID)")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--peer", help="peer name (with --config: the peers section's entry)")
    p.add_argument("--config", type=Path, help="daemon configuration holding --peer")
    p.add_argument("--peer-url", help="https://HOST:PORT of the receiver")
    _add_tls_options(p, required=False)
    p.add_argument(
        "--streams", type=cli_args.positive_int, help="parallel record streams (default 4)"
    )
    p.add_argument("--bwlimit", type=cli_args.byte_rate, help="bytes per second, e.g. 50MiB")
    p.add_argument("--full", action="store_true", help="offer every id, not only changes")
    add_key_options(p)
    p.set_defaults(func=Handler("peer", "cmd_replicate"))


def _add_tls_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--cert", type=Path, required=required, help="this site's certificate")
    p.add_argument("--key", type=Path, required=required, help="this site's private key")
    p.add_argument("--ca", type=Path, required=required, help="the sites' CA certificate")
