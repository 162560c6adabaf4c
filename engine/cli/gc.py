"""``tessera gc``: garbage collection of a store (``engine.maint.gc``).

Registered from ``engine.cli.maint.register``. The command opens the store for
writing: GC runs in the process that holds the writer lock, beside that process's backups
(the daemon runs it as a job); from the command line it therefore needs no backup or daemon
holding the store, and says so (``StoreLocked``) otherwise.
"""

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from engine.app.maintenance import run_gc
from engine.cli import args as cli_args
from engine.cli import service as cli_service
from engine.cli.exits import EXIT_OK
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.maint.gc import GcOptions, GcResult
from engine.maint.gc_defaults import DEFAULT_REPACK_THRESHOLD
from engine.maint.retention import Duration
from engine.store.chunk_store import Store
from engine.util import aio

MB = 1_000_000  # --rate-limit unit, as disk tools quote it

OpenStore = Callable[[argparse.Namespace, bool], Store]


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    open_store: OpenStore,
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
        default=DEFAULT_REPACK_THRESHOLD,
        metavar="RATIO",
        help=f"repack packs whose live bytes are below RATIO of their size "
        f"(default {DEFAULT_REPACK_THRESHOLD})",
    )
    p.add_argument(
        "--grace",
        type=cli_args.duration,
        default="7d",
        metavar="DURATION",
        help="keep retired packs and removed snapshots this long (default 7d; e.g. 12h, 2w)",
    )
    p.add_argument(
        "--rate-limit", type=cli_args.positive_float, metavar="MB/s", help="cap repack I/O"
    )
    add_key_options(p)
    p.set_defaults(func=lambda a: cmd_gc(a, open_store))


def options_from_args(args: argparse.Namespace) -> GcOptions:
    try:
        duration: Duration = args.grace
        now = datetime.now(UTC)
        return GcOptions(
            dry_run=args.dry_run,
            repack_threshold=args.repack_threshold,
            grace=now - duration.before(now),
            rate_limit=args.rate_limit * MB if args.rate_limit is not None else None,
            progress=_progress if sys.stderr.isatty() and not args.json else None,
        )
    except ValueError as e:
        raise ConfigError(message=f"gc: {e}") from e


def _progress(step: str, done: int, total: int) -> None:
    print(f"\rgc: {step} {done}/{total}   ", end="", file=sys.stderr, flush=True)


def cmd_gc(args: argparse.Namespace, open_store: OpenStore) -> int:
    opts = options_from_args(args)
    if args.config is not None and (socket := cli_service.daemon_socket(args.config)):
        if args.dry_run:
            raise ConfigError(
                message="gc: --dry-run runs here only; stop the daemon or use --store"
            )
        # The daemon runs it as a job with its configured grace and threshold.
        return aio.run(cli_service.submit_and_follow(socket, "/v1/maintenance/gc", {}))
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
