"""``tessera export SNAPSHOT``: serve one disk of a restore point over NBD: its options.
What it runs is ``engine.cli.commands.export``.

Registered by ``engine.cli.main.build_parser`` through ``register``; the key options are
passed in so this module does not import ``engine.cli.main`` (which imports it)::

    tessera export 3f2a9c1e --store /srv/tessera/store [--disk ID_OR_NAME]
        (--socket PATH | --listen HOST:PORT) [--writable-overlay FILE]
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli.commands import Handler


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
        "local copy-on-write overlay) until Ctrl-C or SIGTERM",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT_ID", help="id or unique prefix")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--disk", help="the disk (id or name); needed when the snapshot has several")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket", type=Path, metavar="PATH", help="a unix socket to create (mode 0600)"
    )
    where.add_argument(
        "--listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="listen on TCP here only (port 0: any free port; no TLS yet, so keep it local)",
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
