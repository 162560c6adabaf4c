"""``tessera store verify`` and ``tessera store repair`` (``engine.maint.verify``): their
options. What they run is ``engine.cli.commands.verify``.

Registered by ``engine.cli.main.build_parser`` through ``register``. Verify opens the store
read-only, so it runs while a backup or the daemon holds the writer lock; repair takes the
writer lock. Exit status: 0 when everything is whole, 3 (integrity) when anything is wrong or
lost.
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli import args as cli_args
from engine.cli.commands import Handler


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``store verify`` and ``store repair`` to the ``store`` command."""
    store_sub = _subparsers(sub.choices["store"])
    p = store_sub.add_parser(
        "verify",
        help="check snapshots reference stored chunks (and data); marks what is damaged",
        description="Structure: manifests authenticate, DiskMaps match their checksums, every "
        "referenced chunk is indexed in a whole pack. --data also reads every record (CRC, "
        "AEAD, re-hash); --percent P reads a sample of P percent of the packs, least recently "
        "verified first. A killed run is resumed by the next one with the same options. "
        "Damaged snapshots are marked (see `tessera snapshots`) and their bad chunks are "
        "stored again by the next backup that reads their data. Runs beside backups.",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--data", action="store_true", help="also read and check every record")
    p.add_argument(
        "--percent", type=cli_args.percent, metavar="P", help="read a sample of P %% of the packs"
    )
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    p.set_defaults(func=Handler("verify", "cmd_store_verify"))

    p = store_sub.add_parser(
        "repair",
        help="rebuild the index, re-seal packs with a damaged trailer, list what is lost",
        description="Rebuild the chunk index from pack trailers (scanning the records of a "
        "pack whose trailer is damaged: every intact record is kept), re-seal such packs "
        "(their intact records go to a new pack, the old one to STORE/quarantine/ with a "
        "note), quarantine packs without an intact record, rebuild a missing or damaged "
        "index.db / catalog.db (a damaged one is moved aside), then verify the structure: "
        "snapshots with missing chunks are marked damaged and listed with their VMs. Takes "
        "the writer lock (stop the daemon first). Exit 3 when anything is lost.",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    add_key_options(p)
    p.set_defaults(func=Handler("verify", "cmd_store_repair"))


def _subparsers(
    parser: argparse.ArgumentParser,
) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError(f"{parser.prog} has no subcommands")
