"""``tessera export SNAPSHOT``: serve one disk of a restore point over NBD: its options.
What it runs is ``engine.cli.commands.export``.

Registered by ``engine.cli.main.build_parser`` through ``register``; the key options are
passed in so this module does not import ``engine.cli.main`` (which imports it)::

    tessera export 3f2a9c1e --store /srv/tessera/store [--disk ID_OR_NAME]
        (--socket PATH | --listen HOST:PORT) [--writable-overlay FILE]
    tessera export 3f2a9c1e --config /etc/tessera/config.yaml [--disk ID_OR_NAME]
        [--writable] [--ttl 8h]          # a daemon job when the daemon runs
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.commands import Handler

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
        help="listen on TCP here only (port 0: any free port; no TLS yet, so keep it local); "
        "served here",
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
