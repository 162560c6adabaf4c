"""``tessera prune``, ``tessera snapshots protect|unprotect|removed|unremove`` (the undo
window of prune), ``tessera store status``: their options (and ``tessera gc``'s, from
``engine.cli.gc``). What they run is ``engine.cli.commands.maint``.

Registered by ``engine.cli.main.build_parser`` through ``register``. Prune opens the store
read-only — it does not take the writer lock, so it runs while a backup holds it — and
serialises itself with the prune lock (see ``engine.maint.prune``).
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli import args as cli_args
from engine.cli import gc as cli_gc
from engine.cli.commands import Handler

KEEP_COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_BUCKET = {"hourly": "hour", "daily": "day", "weekly": "week", "monthly": "month", "yearly": "year"}


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``prune``, ``snapshots protect|unprotect`` and ``store status`` to the parser."""
    p = sub.add_parser(
        "prune",
        help="remove snapshots no keep rule keeps (chunks stay until GC)",
        description="Plan with restic-like keep rules per VM and remove what no rule keeps. "
        "The newest snapshot of each VM and protected snapshots are always kept. Removed "
        "snapshots wait in STORE/removed/ for the GC grace period; their chunks are freed "
        "by GC. Runs beside backups (it takes the prune lock, not the writer lock).",
    )
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--vm", help="only this VM (id or name)")
    for what in KEEP_COUNTS:
        p.add_argument(
            f"--keep-{what}",
            type=cli_args.non_negative_int,
            metavar="N",
            help="keep the N newest snapshots"
            if what == "last"
            else f"keep the newest snapshot of each of the N latest {_BUCKET[what]}s that have one",
        )
    p.add_argument("--keep-within", metavar="DURATION", help="e.g. 30d, 12h, 2w, 6m, 1y")
    p.add_argument("--tz", help="time zone of the calendar buckets (default: local)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, remove nothing")
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    p.set_defaults(func=Handler("maint", "cmd_prune"))

    snapshots = sub.choices["snapshots"]
    ssub = snapshots.add_subparsers(dest="snapshots_command", metavar="ACTION")
    for action, text in (
        ("protect", "keep a snapshot from ever being pruned"),
        ("unprotect", "let prune decide about a snapshot again"),
    ):
        p = ssub.add_parser(action, help=text)
        p.add_argument("snapshot", metavar="SNAPSHOT_ID", help="id or unique prefix")
        p.add_argument("--store", type=Path, required=True)
        add_key_options(p)
        p.set_defaults(func=Handler("maint", "cmd_protect"))

    p = ssub.add_parser(
        "removed",
        help="list the snapshots prune removed that can still be brought back (unremove)",
        description="Prune moves a removed snapshot to STORE/removed/ and GC deletes it there "
        "once the grace period (gc --grace, the config's gc_grace) has passed since its "
        "removal. Until then `snapshots unremove` brings it back.",
    )
    p.add_argument("--store", type=Path, required=True, help="the store")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=Handler("maint", "cmd_removed"))

    p = ssub.add_parser(
        "unremove",
        help="undo prune: list a removed snapshot again (within the GC grace period)",
        description="Move a snapshot prune removed back from STORE/removed/: it is listed, "
        "restorable and counted by retention again. Possible until GC deletes it (after "
        "the grace period); its chunks are kept as long as it is in removed/.",
    )
    p.add_argument(
        "snapshots", nargs="+", metavar="SNAPSHOT_ID", help="id or unique prefix (of a removed one)"
    )
    p.add_argument("--store", type=Path, required=True, help="the store")
    add_key_options(p)
    p.set_defaults(func=Handler("maint", "cmd_unremove"))

    store_sub = _subparsers(sub.choices["store"])
    p = store_sub.add_parser(
        "status", help="space per VM and snapshot: unique, shared, what pruning frees"
    )
    p.add_argument("path", type=Path)
    p.add_argument("--snapshots", action="store_true", help="also one row per snapshot")
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    p.set_defaults(func=Handler("maint", "cmd_store_status"))
    cli_gc.register(sub, add_key_options)  # tessera gc (engine.cli.gc)


def _subparsers(
    parser: argparse.ArgumentParser,
) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError(f"{parser.prog} has no subcommands")
