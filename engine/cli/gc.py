"""``tessera gc``: garbage collection of a store (``engine.maint.gc``): its options. What it
runs is ``engine.cli.commands.gc``.

Registered from ``engine.cli.maint.register``. The command opens the store for
writing: GC runs in the process that holds the writer lock, beside that process's backups
(the daemon runs it as a job). With ``--config`` and a daemon answering on the configuration's
socket, the daemon runs it, with the options given here (``--dry-run`` too) and its
configuration's for the rest; otherwise it runs here, which needs no backup or daemon holding
the store (``StoreLocked`` says so).
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli import args as cli_args
from engine.cli.commands import Handler
from engine.maint.gc_defaults import DEFAULT_REPACK_THRESHOLD


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "gc",
        help="free chunks no snapshot references; repack sparse packs",
        description="Mark every chunk committed snapshots (and removed ones still in their "
        "grace period) reference, delete the rest once no running backup can have "
        "deduplicated against them, repack packs whose live share is under the threshold, "
        "and delete packs that have been in STORE/trash/ longer than the grace period.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path)
    where.add_argument(
        "--config",
        type=Path,
        help="the daemon configuration: through the running daemon (it holds the store), "
        "else on the configuration's store here",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="report what would happen, change nothing"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--repack-threshold",
        type=cli_args.ratio,
        metavar="RATIO",
        help=f"repack packs whose live bytes are below RATIO of their size "
        f"(default {DEFAULT_REPACK_THRESHOLD}; through the daemon: its configuration's)",
    )
    p.add_argument(
        "--grace",
        type=cli_args.grace,
        metavar="DURATION",
        help="keep retired packs and removed snapshots this long, written as the config's "
        "gc_grace (default 7d, through the daemon its gc_grace; e.g. 12h, 2w, 90m, 1s; "
        "0: no grace)",
    )
    p.add_argument(
        "--rate-limit",
        type=cli_args.byte_rate,
        metavar="BYTES",
        help="cap repack I/O at BYTES per second, e.g. 50MiB (binary units, as every size)",
    )
    add_key_options(p)
    p.set_defaults(func=Handler("gc", "cmd_gc"))
