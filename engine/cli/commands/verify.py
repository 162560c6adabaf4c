"""What ``tessera store verify`` and ``tessera store repair`` run (their options:
``engine.cli.verify``)."""

import argparse
import json
import sys
from collections.abc import Callable

from engine.app.maintenance import finding_line, run_verify, verify_lines
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_INTEGRITY, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.maint.repair import RepairResult, repair
from engine.maint.verify import (
    VerifyOptions,
    VerifyProgress,
    VerifyResult,
)
from engine.util import aio


def _show(display: ProgressDisplay) -> Callable[[VerifyProgress], None]:
    def progress(p: VerifyProgress) -> None:
        if p.step == "data" and p.bytes_total:
            display.update("packs", p.bytes_done, p.bytes_total)

    return progress


def cmd_store_verify(args: argparse.Namespace) -> int:
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


def cmd_store_repair(args: argparse.Namespace) -> int:
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
