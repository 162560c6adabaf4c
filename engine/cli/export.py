"""``tessera export SNAPSHOT``: serve one disk of a restore point over NBD: its options.
What it runs is ``engine.cli.commands.export``.

Registered by ``engine.cli.main.build_parser`` through ``register``; the key options are
passed in so this module does not import ``engine.cli.main`` (which imports it)::

    tessera export 3f2a9c1e --store /srv/tessera/store [--disk ID_OR_NAME]
        (--socket PATH | --listen HOST:PORT) [--writable-overlay FILE]
        [--tls-dir DIR | --tls-cert FILE --tls-key FILE [--tls-ca FILE] | --no-tls]
    tessera export 3f2a9c1e --config /etc/tessera/config.yaml [--disk ID_OR_NAME]
        [--writable] [--ttl 8h]          # a daemon job when the daemon runs

TLS is what clients must speak (NBD_OPT_STARTTLS) before anything else. TCP on an address
that is not loopback needs TLS or an explicit ``--no-tls``: a backup is not served in
clear by accident (checked by ``engine.cli.commands.export.tls_files``).
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.commands import Handler

# engine.io.nbd.tls's file names, written out: importing it would load the NBD package (and
# asyncio) for every --help (tests/integration/test_cli_imports.py); a unit test checks that
# both say the same.
CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"

if TYPE_CHECKING:
    from engine.config.types import Duration


def duration(text: str) -> "Duration":
    """``--ttl``: a duration as the configuration writes them (``8h``, ``30m``)."""
    # Here, not at the top: parsing the command line loads no configuration code (issue 15).
    from engine.config.types import Duration  # noqa: PLC0415

    try:
        return Duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:10809`` for IPv6) → (host, port); ArgumentTypeError else."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``export`` to the parser."""
    p = sub.add_parser(
        "export",
        help="serve a disk of a restore point over NBD (read-only, or writable through a "
        "local copy-on-write overlay) until Ctrl-C or SIGTERM; with --config, as a job of the "
        "daemon when it runs (until `tessera cancel JOB` or --ttl)",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT_ID", help="id or unique prefix")
    store = p.add_mutually_exclusive_group(required=True)
    store.add_argument("--store", type=Path, help="the store's directory (served here)")
    store.add_argument(
        "--config",
        type=Path,
        help="the daemon's configuration: its daemon serves the export when it runs, else "
        "this command serves it from the configuration's store",
    )
    p.add_argument("--disk", help="the disk (id or name); needed when the snapshot has several")
    p.add_argument("--direct", action="store_true", help="serve here even when a daemon runs")
    p.add_argument(
        "--store-name", help="through the daemon: the configuration's store (if several)"
    )
    p.add_argument(
        "--writable",
        action="store_true",
        help="through the daemon: accept writes into an overlay the daemon keeps (and "
        "removes when the export ends)",
    )
    p.add_argument(
        "--ttl",
        type=duration,
        metavar="DURATION",
        help="through the daemon: end the export after this long (8h, 30m); default: "
        "until `tessera cancel JOB`",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="a unix socket to create (mode 0600); served here",
    )
    where.add_argument(
        "--listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="listen on TCP here only (port 0: any free port); an address that is not "
        "loopback needs TLS (--tls-dir, --tls-cert/--tls-key) or --no-tls; served here",
    )
    tls = p.add_argument_group(
        "TLS",
        "clients must start TLS first (nbds:// URIs)",
    )
    how = tls.add_mutually_exclusive_group()
    how.add_argument(
        "--tls-dir",
        type=Path,
        metavar="DIR",
        help=f"certificates as qemu-nbd and libnbd lay them out: DIR/{SERVER_CERT}, "
        f"DIR/{SERVER_KEY}, and if DIR/{CA_CERT} exists clients need a certificate it signed",
    )
    how.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="the server's certificate (PEM, chain)"
    )
    how.add_argument(
        "--no-tls",
        action="store_true",
        help="serve TCP in clear on an address that is not loopback (a trusted network only)",
    )
    tls.add_argument("--tls-key", type=Path, metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--tls-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates signed by this CA (PEM): mutual TLS",
    )
    p.add_argument(
        "--writable-overlay",
        type=Path,
        metavar="FILE",
        help="accept writes into this sparse file (and FILE.tessera-map beside it); the "
        "store never changes; the same overlay can be served again",
    )
    add_key_options(p)
    p.set_defaults(func=Handler("export", "cmd_export"))
