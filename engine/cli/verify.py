"""``tessera store verify`` and ``tessera store repair`` (``engine.maint.verify``).

Registered by ``engine.cli.main.build_parser`` through ``register``; ``open_store`` is
passed in so this module does not import ``cli``. Verify opens the store read-only, so it
runs while a backup or the daemon holds the writer lock; repair takes the writer lock.
Exit status: 0 when everything is whole, 3 (integrity) when anything is wrong or lost.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from engine.app.maintenance import finding_line, run_verify, verify_lines
from engine.cli import args as cli_args
from engine.cli.exits import EXIT_INTEGRITY, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.maint.repair import RepairResult, repair
from engine.maint.verify import (
    VerifyOptions,
    VerifyProgress,
    VerifyResult,
)
from engine.store.chunk_store import Store
from engine.util import aio

OpenStore = Callable[[argparse.Namespace, bool], Store]


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    open_store: OpenStore,
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
    p.set_defaults(func=lambda a: cmd_store_verify(a, open_store))

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
    p.set_defaults(func=lambda a: cmd_store_repair(a, open_store))


def _subparsers(
    parser: argparse.ArgumentParser,
) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError(f"{parser.prog} has no subcommands")


def _show(display: ProgressDisplay) -> Callable[[VerifyProgress], None]:
    def progress(p: VerifyProgress) -> None:
        if p.step == "data" and p.bytes_total:
            display.update("packs", p.bytes_done, p.bytes_total)

    return progress


def cmd_store_verify(args: argparse.Namespace, open_store: OpenStore) -> int:
    with open_store(args, False) as store, ProgressDisplay(f"verify {store.path}") as display:
        options = VerifyOptions(data=args.data, percent=args.percent, progress=_show(display))
        result = aio.run(run_verify(store, options))
    if args.json:
        print(json.dumps(result.doc(), indent=2))
    else:
        _print_verify(result)
    return EXIT_OK if result.ok else EXIT_INTEGRITY


def _print_verify(result: VerifyResult) -> None:
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for line in verify_lines(result):
        print(line)


def cmd_store_repair(args: argparse.Namespace, open_store: OpenStore) -> int:
    with open_store(args, True) as store, ProgressDisplay(f"repair {store.path}") as display:
        result = repair(store, progress=_show(display))
    if args.json:
        print(json.dumps(result.doc(), indent=2))
    else:
        _print_repair(result)
    return EXIT_INTEGRITY if result.lost else EXIT_OK


def _print_repair(result: RepairResult) -> None:
    for line in result.recovery:
        print(line)
    print(f"index rebuilt: {result.indexed_packs} packs, {result.indexed_chunks} chunks")
    lost_in = {f.subject: f for f in result.verify.findings}
    for r in result.resealed:
        print(
            f"re-sealed pack {r.pack} ({r.reason}) as {r.new_pack}: {r.kept} records kept, "
            f"{len(r.lost)} damaged ranges lost; old pack moved to quarantine"
        )
        for line, chunk in zip(r.lost, r.lost_chunks + [""] * len(r.lost), strict=False):
            hurt = lost_in.get(chunk)
            who = f" (snapshots: {', '.join(hurt.snapshots)})" if hurt and hurt.snapshots else ""
            print(f"  lost {line}{who}")
    for w in result.verify.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for q in result.quarantined:
        print(f"quarantined pack {q.pack} to {q.path}: {q.reason}")
    for f in result.verify.findings:
        print(finding_line(f))
    if not result.lost:
        print("nothing is lost")
        return
    if result.verify.damaged:
        print(
            f"lost: {len(result.verify.damaged)} snapshots have missing or damaged data: "
            f"{', '.join(result.verify.damaged)} (VMs: {', '.join(result.verify.vms)})"
        )
    else:
        print("lost: no snapshot references the lost records' chunks")
