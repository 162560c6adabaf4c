"""What ``tessera gc`` runs (its options: ``engine.cli.gc``)."""

import argparse
import json
import sys

from engine.app.maintenance import run_gc
from engine.cli.commands import service as cli_service
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_OK
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.maint.gc import GcOptions, GcResult
from engine.maint.gc_defaults import DEFAULT_GRACE, DEFAULT_REPACK_THRESHOLD
from engine.util import aio


def options_from_args(args: argparse.Namespace) -> GcOptions:
    try:
        return GcOptions(
            dry_run=args.dry_run,
            repack_threshold=(
                DEFAULT_REPACK_THRESHOLD if args.repack_threshold is None else args.repack_threshold
            ),
            grace=DEFAULT_GRACE if args.grace is None else args.grace,
            rate_limit=args.rate_limit,
            progress=_progress if sys.stderr.isatty() and not args.json else None,
        )
    except ValueError as e:
        raise ConfigError(message=f"gc: {e}") from e


def _progress(step: str, done: int, total: int) -> None:
    print(f"\rgc: {step} {done}/{total}   ", end="", file=sys.stderr, flush=True)


def cmd_gc(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if args.config is not None and (socket := cli_service.daemon_socket(args.config)):
        # The daemon runs it as a job: what was given here, its configuration for the rest.
        body = {"dry_run": args.dry_run}
        if args.repack_threshold is not None:
            body["repack_threshold"] = args.repack_threshold
        if args.grace is not None:
            body["grace_seconds"] = args.grace.total_seconds()
        if args.rate_limit is not None:
            body["rate_limit"] = int(args.rate_limit)
        return aio.run(cli_service.submit_and_follow(socket, "/v1/maintenance/gc", body))
    with open_store(args, True) as store:
        result = aio.run(run_gc(store, opts))
    if opts.progress is not None:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.doc(), indent=2))
    else:
        _print(result)
    return EXIT_OK


def _print(result: GcResult) -> None:
    for line in result.lines():
        print(line)
    freed = result.bytes_retired - result.bytes_copied
    verb = "would move" if result.dry_run else "moved"
    print(
        f"{verb} {human_bytes(freed)} to the trash; freed {human_bytes(result.trash_bytes_freed)}"
        f" in {result.seconds:.1f} s"
    )
