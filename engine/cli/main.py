"""``tessera``'s entry point: the parser of every command (``build_parser``) and ``main``,
which runs the chosen command and maps errors to exit codes.

Building the parser imports no command's machinery: each command names its function with a
``Handler`` (``engine.cli.commands``), imported only when that command runs (issue 15).
``store``, ``backup``, ``snapshots``, ``restore`` and ``lab`` are declared here; the other
groups in their own modules (``register``).
"""

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.app.requests import BACKUP_FLOWS, RESTORE_FLOWS
from engine.cli import args as cli_args
from engine.cli import config as cli_config
from engine.cli import export as cli_export
from engine.cli import files as cli_files
from engine.cli import helptext
from engine.cli import maint as cli_maint
from engine.cli import notify as cli_notify
from engine.cli import peer as cli_peer
from engine.cli import service as cli_service
from engine.cli import standby as cli_standby
from engine.cli import verify as cli_verify
from engine.cli.commands import Handler
from engine.cli.exits import EXIT_FAILED, EXIT_INTEGRITY, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_USAGE
from engine.core.errors import ConfigError, EngineError, IntegrityError
from engine.core.units import human_bytes
from engine.pipeline.defaults import DEFAULT_DISKS_AT_ONCE, DEFAULT_READERS
from engine.sched.level import LEVELS
from engine.store.dbfiles import describe, os_reason
from engine.store.layout import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES,
    ENCRYPTIONS,
    MAX_ZSTD_LEVEL,
    MIN_ZSTD_LEVEL,
)

DEFAULT_CONFIG = Path("/etc/tessera/config.yaml")
LEVEL_HELP = (
    "full reads every allocated block; incremental what changed since the VM's last backup; "
    "differential what changed since its last full (default incremental)"
)


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", type=Path, help="key file kept outside the store")
    p.add_argument(
        "--passphrase-file",
        type=Path,
        help="file holding the passphrase (else $TESSERA_PASSPHRASE, else a prompt)",
    )


class _Version(argparse.Action):
    """``--version``: ``tessera 0.1.0 (Python 3.11.2, linux)`` on stdout, exit 0. The
    installed distribution's metadata is read only when asked (importlib.metadata costs
    every other command's start ~10 ms, issue 15)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        import platform  # noqa: PLC0415
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            number = version("tessera")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "(not installed)"
        print(f"tessera {number} (Python {platform.python_version()}, {sys.platform})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="Agentless backup for oVirt/RHV VMs."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_store_commands(sub)
    cli_verify.register(sub, _add_key_options)  # store verify, store repair
    _add_job_commands(sub)
    cli_maint.register(sub, _add_key_options)  # prune, protect, store status
    cli_config.register(sub, DEFAULT_CONFIG)  # check-config, show-config
    cli_notify.register(sub, DEFAULT_CONFIG)  # notify test
    cli_service.register(sub, DEFAULT_CONFIG)  # run, vms, policies, jobs, job, cancel
    cli_peer.register(sub, _add_key_options)  # peer init-ca|issue|serve, replicate
    cli_standby.register(sub, _add_key_options)  # standby refresh
    cli_export.register(sub, _add_key_options)  # export (NBD)
    cli_files.register(sub, _add_key_options)  # files ls|find|get, mount
    helptext.document(parser)  # shared option texts, examples, exit codes
    return parser


def _add_store_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    store = sub.add_parser("store", help="create and inspect chunk stores")
    ssub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")

    p = ssub.add_parser("init", help="create a new store")
    p.add_argument("path", type=Path)
    p.add_argument(
        "--chunk-size",
        type=cli_args.chunk_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="bytes per chunk, a power of two from 64k to 8M; fixed for the store's life "
        f"(default {human_bytes(DEFAULT_CHUNK_SIZE)})",
    )
    p.add_argument(
        "--pack-size",
        type=cli_args.pack_size,
        default=DEFAULT_PACK_SIZE,
        metavar="SIZE",
        help=f"target size of pack files, e.g. 64M (default {human_bytes(DEFAULT_PACK_SIZE)})",
    )
    p.add_argument(
        "--encryption",
        choices=ENCRYPTIONS,
        default=ENCRYPTION_AES,
        help=f"{ENCRYPTION_AES} (a key file sealed by a passphrase; the default) or none",
    )
    p.add_argument(
        "--zstd-level",
        type=int,
        default=DEFAULT_ZSTD_LEVEL,
        help=f"compression of new records, {MIN_ZSTD_LEVEL} (fastest) to {MAX_ZSTD_LEVEL} "
        f"(smallest); default {DEFAULT_ZSTD_LEVEL}. On VM images level 1 stores ~10 %% more "
        "than 3 for ~1.5x the speed",
    )
    _add_s3_options(p, attach=False)
    _add_key_options(p)
    p.set_defaults(func=Handler("store", "cmd_store_init"))

    p = ssub.add_parser(
        "attach",
        help="make PATH a store on an S3 bucket prefix another DataMover wrote (the bucket "
        "alone: configuration, key file, snapshots and packs come from it)",
    )
    p.add_argument("path", type=Path)
    _add_s3_options(p, attach=True)
    _add_key_options(p)
    p.set_defaults(func=Handler("store", "cmd_store_attach"))

    p = ssub.add_parser(
        "break-lock",
        help="remove the writer lock of the bucket a store's packs live in, left by a "
        "DataMover that is gone for good (never while it may still run)",
    )
    p.add_argument("path", type=Path)
    p.set_defaults(func=Handler("store", "cmd_store_break_lock"))

    p = ssub.add_parser(
        "info", help="format, sizes, dedup and compression ratios (no key or passphrase needed)"
    )
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    _add_key_options(p)
    p.set_defaults(func=Handler("store", "cmd_store_info"))

    p = ssub.add_parser(
        "rebuild-index",
        help="rebuild the chunk index (and a missing or damaged catalog) from packs and manifests",
    )
    p.add_argument("path", type=Path)
    _add_key_options(p)
    p.set_defaults(func=Handler("store", "cmd_store_rebuild_index"))


def _add_s3_options(p: argparse.ArgumentParser, attach: bool) -> None:
    """The bucket of ``store init --s3`` (optional) and ``store attach`` (required)."""
    p.add_argument(
        "--s3",
        type=cli_args.s3_url,
        required=attach,
        metavar="s3://BUCKET[/PREFIX]",
        help="the bucket prefix the store's packs, configuration and snapshots are in"
        if attach
        else "keep sealed packs in this S3 bucket (Ceph RGW or any S3 with conditional "
        "create); PATH keeps the index, catalog, snapshots and a cache of packs. The key "
        "comes from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and is kept in "
        "PATH/keys/s3.json (0600)",
    )
    p.add_argument(
        "--s3-endpoint",
        type=cli_args.http_url,
        required=attach,
        metavar="URL",
        help="the S3 endpoint" + ("" if attach else " (with --s3)"),
    )
    p.add_argument("--s3-region", default="us-east-1", help="default us-east-1")
    p.add_argument(
        "--cache-size",
        type=cli_args.size,
        default=DEFAULT_CACHE_BYTES,
        metavar="SIZE",
        help="packs kept in PATH/packs, recently written and read first "
        f"(default {human_bytes(DEFAULT_CACHE_BYTES)}; never less than two packs)",
    )
    _add_budget_options(p)
    if attach:
        return  # the object lock is the bucket's store's, in its config.json
    p.add_argument(
        "--object-lock",
        choices=("governance", "compliance"),
        help="with --s3: lock every object put in the bucket (S3 object lock; the bucket "
        "must be created with it and have no default retention). governance: only a key "
        "allowed to bypass it can delete early; compliance: nobody can",
    )
    p.add_argument(
        "--lock-for",
        metavar="DURATION",
        help="with --object-lock: how long each snapshot stays locked from its backup "
        "(e.g. 30d, 12h, 2w); prune keeps a snapshot, and GC its packs, until then",
    )


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--s3-requests-per-second",
        type=cli_args.positive_float,
        default=0,
        metavar="N",
        help="with --s3: requests sent to the bucket at most per second, retries included "
        "(default 0: no limit)",
    )
    p.add_argument(
        "--s3-requests-per-month",
        type=cli_args.positive_int,
        default=0,
        metavar="N",
        help="with --s3: refuse work once N requests were sent in a calendar month (UTC; "
        "default no limit); kept in config.json, where it can be raised",
    )


def _add_job_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    backup = sub.add_parser("backup", help="back up now (through the daemon when it runs)")
    bsub = backup.add_subparsers(dest="backup_command", required=True, metavar="WHAT")
    p = bsub.add_parser("image", help="back up local qcow2/raw images (each one a VM)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--level", choices=LEVELS, default="incremental", help=LEVEL_HELP)
    p.add_argument("--vm", help="treat all PATHs as the disks of one VM with this name")
    p.add_argument(
        "--readers",
        type=cli_args.positive_int,
        default=DEFAULT_READERS,
        help="connections per disk",
    )
    _add_key_options(p)
    p.set_defaults(func=Handler("backup", "cmd_backup_image"))

    p = bsub.add_parser("vm", help="back up oVirt VMs through the engine (names or globs)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--engine", help="engine name in the configuration (if several)")
    p.add_argument("--level", choices=LEVELS, default="incremental", help=LEVEL_HELP)
    p.add_argument(
        "--flow",
        choices=BACKUP_FLOWS,
        default="auto",
        help="snapshot-attach: LAN free, through the config's datamover VM",
    )
    p.add_argument(
        "--require-quiesce",
        action="store_true",
        help="refuse a running VM whose guest agent cannot freeze its filesystems (any flow)",
    )
    p.add_argument(
        "--disk",
        dest="disks",
        action="append",
        default=[],
        metavar="PATTERN",
        help="back up only the disks whose name (alias) matches this glob, or whose id it is "
        "(repeatable; default: every disk); the others are skipped as not selected, and a VM "
        "none of whose disks match fails",
    )
    p.add_argument(
        "--readers",
        type=cli_args.positive_int,
        default=DEFAULT_READERS,
        help="connections per disk",
    )
    p.add_argument("--direct", action="store_true", help="run here even when a daemon runs")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and check the VMs, their disks, the flow, the level and the store, and "
        "print what the backup would do; nothing is read, written or created (here, even "
        "when a daemon runs)",
    )
    _add_key_options(p)
    p.set_defaults(func=Handler("vm", "cmd_backup_vm"))

    _add_restore_commands(sub)


def _add_restore_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("snapshots", help="list restore points (or protect or check one: ACTION)")
    where = p.add_mutually_exclusive_group()  # required unless an ACTION says otherwise
    where.add_argument("--store", type=Path)
    where.add_argument("--config", type=Path, help="use the configuration's store")
    p.add_argument("--vm", help="only this VM (id or name)")
    p.add_argument("--json", action="store_true")
    _add_key_options(p)
    p.set_defaults(func=Handler("store", "cmd_snapshots"))

    p = sub.add_parser(
        "restore",
        help="restore a snapshot's disks to local images (--to), or into the engine as a new "
        "VM (--config without --to)",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT_ID", help="id or unique prefix")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path)
    where.add_argument("--config", type=Path, help="use the configuration's store and engine")
    p.add_argument("--disk", help="only this disk (id or name): with --to, or with --into-vm")
    p.add_argument(
        "--to",
        type=cli_args.absolute_path,
        help="image file (one disk) or directory (several)",
    )
    p.add_argument(
        "--format",
        choices=("qcow2", "raw"),
        default=None,
        dest="image_format",
        help="image format written with --to (default: each disk's recorded format)",
    )
    p.add_argument(
        "--disks-at-once",
        type=cli_args.positive_int,
        default=None,
        metavar="N",
        help=f"images written at once with --to (default {DEFAULT_DISKS_AT_ONCE}); into the "
        "engine: the config's limits.restore_disks",
    )
    p.add_argument("--engine", help="engine name in the configuration (if several)")
    p.add_argument("--name", help="the new VM's name (default: <original>-restored)")
    p.add_argument("--cluster", help="the new VM's cluster (default: the one in its OVF)")
    p.add_argument(
        "--storage-domain", help="storage domain for every disk (default: the recorded ones)"
    )
    p.add_argument(
        "--flow",
        choices=RESTORE_FLOWS,
        default="imageio",
        help="how disks are written into the engine: imageio uploads, or attach (LAN free, "
        "through the config's datamover VM)",
    )
    p.add_argument(
        "--into-vm",
        metavar="VM",
        help="attach the restored disk(s) to this existing VM (name or id) instead of a new VM",
    )
    p.add_argument("--direct", action="store_true", help="run here even when a daemon runs")
    _add_key_options(p)
    p.set_defaults(func=Handler("restore", "cmd_restore"))

    lab = sub.add_parser("lab", help="the embedded lab: fake engine, imageio, generated VMs")
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    for action, text in (
        ("up", "start the lab in the background"),
        ("show", "print the lab's engine and VMs"),
        ("down", "stop the lab"),
    ):
        p = lsub.add_parser(action, help=text)
        p.add_argument("--dir", type=Path, required=True, help="the lab's directory")
        p.add_argument("--json", action="store_true")
        if action == "up":
            p.add_argument(
                "--sso-idle-timeout",
                type=cli_args.positive_float,
                metavar="SECONDS",
                help="an SSO token expires after this long without a request (default: 1800, "
                "the engine's UserSessionTimeOutInterval of 30 minutes)",
            )
            p.add_argument(
                "--sso-lifetime",
                type=cli_args.positive_float,
                metavar="SECONDS",
                help="an SSO token expires this long after login, however busy (default: "
                "36000, the engine's UserSessionHardLimit of 600 minutes); clients must log "
                "in again on the engine's 401, as ovirtsdk4 does once per request",
            )
        p.set_defaults(func=Handler("lab", "cmd_lab"))
        if action == "up":
            _lab_knobs(p)


def _lab_knobs(p: argparse.ArgumentParser) -> None:
    """``lab up``'s timing and fault knobs (the lab engine's ``Faults``); the lab behaves as
    a real engine with any of them, only sooner or slower."""
    k = p.add_argument_group(
        "timing and fault knobs",
        "The lab behaves like ovirt-engine by default: idle image transfers are cancelled, "
        "phases move with time. These make it happen sooner or slower.",
    )
    k.add_argument(
        "--inactivity-timeout",
        type=cli_args.int_at_least(1),
        metavar="SECONDS",
        help="cancel an image transfer whose imageio ticket sat idle this long, whatever "
        "inactivity_timeout it asked for (default: its own, else the engine's 60 s)",
    )
    k.add_argument(
        "--slow-reads",
        type=cli_args.int_at_least(1),
        metavar="IOPS",
        help="slow storage: every disk export serves at most IOPS requests per second, so "
        "imageio reads and writes crawl (default: unthrottled)",
    )
    k.add_argument(
        "--phase-seconds",
        type=cli_args.positive_float,
        metavar="SECONDS",
        help="how long the engine's background work takes per phase step of transfers, "
        "backups, snapshots and checkpoint deletes (default: 0.25)",
    )
    k.add_argument(
        "--disk-seconds",
        type=cli_args.positive_float,
        metavar="SECONDS",
        help="how long a new disk stays locked while the engine creates its volume, "
        "whoever polls (default: 0.25)",
    )
    k.add_argument(
        "--ticket-timeout",
        type=cli_args.int_at_least(1),
        metavar="SECONDS",
        help="imageio ticket validity after its last use or extend (default: the engine's 300)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv``); its exit code (``exits``).

    A reader that stops early (``tessera snapshots | head``) ends the command quietly with
    ``EXIT_PIPE``, as a program killed by SIGPIPE ends in a shell: no traceback, no error
    line. Standard output is flushed here so that such a reader is found here too, not by
    the interpreter's flush at exit (which would print ``Exception ignored ...``).
    """
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # What is still buffered cannot be written; the interpreter's flush at exit must not
        # try again, so standard output goes to /dev/null from here on.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Once the arguments parse: logging is not needed for --help or a usage error (issue 15).
    import logging  # noqa: PLC0415

    from engine.obs.log import configure as configure_logging  # noqa: PLC0415

    configure_logging(logging.WARNING - 10 * min(args.verbose, 2))
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IntegrityError as e:
        print(f"tessera: integrity error: {e}", file=sys.stderr)
        return EXIT_INTEGRITY
    except EngineError as e:
        print(f"tessera: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # the reader of standard output left: not the store's error (``main``)
    except (sqlite3.Error, OSError) as e:  # a last resort: the store maps what it knows
        where = getattr(args, "path", None) or getattr(args, "store", None) or "tessera"
        reason = describe(e) if isinstance(e, sqlite3.Error) else os_reason(e)
        print(f"tessera: {where}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
