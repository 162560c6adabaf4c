"""``tessera`` command line: argument parsing, error → exit code mapping, output."""

import argparse
import json
import logging
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from engine.app.backup import backup_sources, backup_vms
from engine.app.passphrase import resolve_passphrase
from engine.app.requests import (
    BACKUP_FLOWS,
    RESTORE_FLOWS,
    ImageRestoreRequest,
    VmBackupRequest,
    VmRestoreRequest,
)
from engine.app.restore import plan_vm_restore, restore_images, restore_vm
from engine.app.stores import JobStore, open_for_jobs
from engine.app.stores import open_store as app_open_store
from engine.cli import args as cli_args
from engine.cli import config as cli_config
from engine.cli import maint as cli_maint
from engine.cli import peer as cli_peer
from engine.cli import service as cli_service
from engine.cli import standby as cli_standby
from engine.cli import verify as cli_verify
from engine.cli.exits import EXIT_FAILED, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE
from engine.cli.progress import ProgressDisplay
from engine.config.loader import load as load_config
from engine.core.errors import ConfigError, EngineError, IntegrityError
from engine.core.units import human_bytes
from engine.jobs.backup import BackupOutcome, Progress
from engine.jobs.states import State
from engine.maint.prune import is_protected
from engine.obs.log import configure as configure_logging
from engine.pipeline.defaults import DEFAULT_READERS
from engine.sched.level import LEVELS
from engine.sources import registry
from engine.store.chunk_store import Store
from engine.store.damage import damage_of
from engine.store.dbfiles import describe, os_reason
from engine.store.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES,
    ENCRYPTION_NONE,
    ENCRYPTIONS,
    MAX_ZSTD_LEVEL,
    MIN_ZSTD_LEVEL,
)
from engine.store.manifest import Manifest
from engine.util import aio

DEFAULT_CONFIG = Path("/etc/tessera/config.yaml")


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", type=Path, help="key file kept outside the store")
    p.add_argument(
        "--passphrase-file",
        type=Path,
        help="file holding the passphrase (else $TESSERA_PASSPHRASE, else a prompt)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="Agentless backup for oVirt/RHV VMs."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_store_commands(sub)
    cli_verify.register(sub, open_store, _add_key_options)  # store verify, store repair
    _add_job_commands(sub)
    cli_maint.register(sub, open_store, _add_key_options)  # prune, protect, store status
    cli_config.register(sub, DEFAULT_CONFIG)  # check-config, show-config
    cli_service.register(sub, DEFAULT_CONFIG)  # run, vms, policies, jobs, job, cancel
    cli_peer.register(sub, open_store, _add_key_options)  # peer init-ca|issue|serve, replicate
    cli_standby.register(sub, open_store, _add_key_options)  # standby refresh
    return parser


def _add_store_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    store = sub.add_parser("store", help="create and inspect chunk stores")
    ssub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")

    p = ssub.add_parser("init", help="create a new store")
    p.add_argument("path", type=Path)
    p.add_argument("--chunk-size", type=cli_args.chunk_size, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--pack-size", type=cli_args.pack_size, default=DEFAULT_PACK_SIZE)
    p.add_argument("--encryption", choices=ENCRYPTIONS, default=ENCRYPTION_AES)
    p.add_argument(
        "--zstd-level",
        type=int,
        default=DEFAULT_ZSTD_LEVEL,
        help=f"compression of new records, {MIN_ZSTD_LEVEL} (fastest) to {MAX_ZSTD_LEVEL} "
        f"(smallest); default {DEFAULT_ZSTD_LEVEL}. On VM images level 1 stores ~10 %% more "
        "than 3 for ~1.5x the speed",
    )
    _add_key_options(p)
    p.set_defaults(func=cmd_store_init)

    p = ssub.add_parser("info", help="format, sizes, dedup and compression ratios")
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true")
    _add_key_options(p)
    p.set_defaults(func=cmd_store_info)

    p = ssub.add_parser(
        "rebuild-index",
        help="rebuild the chunk index (and a missing or damaged catalog) from packs and manifests",
    )
    p.add_argument("path", type=Path)
    _add_key_options(p)
    p.set_defaults(func=cmd_store_rebuild_index)


def _add_job_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    backup = sub.add_parser("backup", help="back up now (through the daemon when it runs)")
    bsub = backup.add_subparsers(dest="backup_command", required=True, metavar="WHAT")
    p = bsub.add_parser("image", help="back up local qcow2/raw images (each one a VM)")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--level", choices=LEVELS, default="incremental")
    p.add_argument("--vm", help="treat all PATHs as the disks of one VM with this name")
    p.add_argument(
        "--readers",
        type=cli_args.positive_int,
        default=DEFAULT_READERS,
        help="connections per disk",
    )
    _add_key_options(p)
    p.set_defaults(func=cmd_backup_image)

    p = bsub.add_parser("vm", help="back up oVirt VMs through the engine (names or globs)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--engine", help="engine name in the configuration (if several)")
    p.add_argument("--level", choices=LEVELS, default="incremental")
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
        "--readers",
        type=cli_args.positive_int,
        default=DEFAULT_READERS,
        help="connections per disk",
    )
    p.add_argument("--direct", action="store_true", help="run here even when a daemon runs")
    _add_key_options(p)
    p.set_defaults(func=cmd_backup_vm)

    _add_restore_commands(sub)


def _add_restore_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("snapshots", help="list restore points (or protect one: ACTION)")
    where = p.add_mutually_exclusive_group()  # required unless an ACTION says otherwise
    where.add_argument("--store", type=Path)
    where.add_argument("--config", type=Path, help="use the configuration's store")
    p.add_argument("--vm", help="only this VM (id or name)")
    p.add_argument("--json", action="store_true")
    _add_key_options(p)
    p.set_defaults(func=cmd_snapshots)

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
    p.add_argument("--format", choices=("qcow2", "raw"), default=None, dest="image_format")
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
    p.set_defaults(func=cmd_restore)

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
        p.set_defaults(func=cmd_lab)
        if action == "up":
            _lab_knobs(p)


def open_store(args: argparse.Namespace, writable: bool) -> Store:
    """The store of ``--store``/``path``, else the configuration's (``--config``); its
    passphrase from ``--passphrase-file``, the environment or a prompt."""
    path = getattr(args, "store", None) or getattr(args, "path", None)
    passphrase_file, key_file = args.passphrase_file, args.key_file
    if path is None:  # from the daemon configuration
        section = load_config(args.config, args.config.parent / "conf.d").store()
        path = section.path
        passphrase_file = passphrase_file or section.passphrase_file
        key_file = key_file or section.key_file
    store = app_open_store(
        path, passphrase_file=passphrase_file, key_file=key_file, writable=writable
    )
    if not writable:
        for line in store.db_problems.values():
            print(f"store {path}: {line}: using a temporary copy", file=sys.stderr)
    for line in store.report.lines():
        print(f"store recovery: {line}", file=sys.stderr)
    return store


async def _job_store(store: Store) -> JobStore:
    """``store`` ready for jobs; what recovering its unfinished jobs did goes to stderr."""
    target, recovered = await open_for_jobs(str(store.path), store)
    for line in recovered:
        print(f"recovery: {line}", file=sys.stderr)
    return target


@contextmanager
def _progress(vm: str) -> Iterator[Progress]:
    with ProgressDisplay(f"backup {vm}") as display:

        def show(disk: str, done: int, total: int) -> None:
            display.update(Path(disk).name, done, total)

        yield show


def _print_backup(outcome: BackupOutcome) -> bool:
    """Print a backup's notes, warnings and summary; True when it succeeded."""
    for note in outcome.notes:
        print(f"note: {note}")
    for warning in outcome.record.warnings:
        print(f"warning: {warning}")
    print(outcome.summary())
    return outcome.record.state is State.SUCCEEDED


def cmd_backup_image(args: argparse.Namespace) -> int:
    for path in args.paths:
        if not path.is_file():
            raise ConfigError(message=f"image {path} does not exist or is not a file")
    _, images = registry.images()
    groups = [args.paths] if args.vm else [[p] for p in args.paths]
    sources = [images.image_source(g, args.vm) for g in groups]

    async def run(store: Store) -> int:
        target = await _job_store(store)
        failed = 0
        try:
            backups = backup_sources(
                target, sources, level=args.level, readers=args.readers, progress=_progress
            )
            async for outcome in backups:
                failed += not _print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


def cmd_backup_vm(args: argparse.Namespace) -> int:
    """Through the daemon when one answers on the config's socket (it holds the store),
    else in this process (``engine.app.backup``)."""
    request = VmBackupRequest(
        vms=tuple(args.names),
        level=args.level,
        flow=args.flow,
        require_quiesce=args.require_quiesce,
        engine=args.engine,
        readers=args.readers,
    )
    request.check()
    if not args.direct and (socket := cli_service.daemon_socket(args.config)) is not None:
        body = {"vms": args.names, "level": args.level, "flow": args.flow}
        body |= {"require_quiesce": args.require_quiesce, "engine": args.engine}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/backups", body))
    config = load_config(args.config, args.config.parent / "conf.d")

    async def run(store: Store) -> int:
        target = await _job_store(store)
        failed = 0
        try:
            async for outcome in backup_vms(config, target, request, progress=_progress):
                failed += not _print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


def cmd_snapshots(args: argparse.Namespace) -> int:
    if args.store is None and args.config is None:
        raise ConfigError(message="snapshots: one of --store or --config is required")
    with open_store(args, writable=False) as store:
        manifests = [store.manifest(e.snapshot_id) for e in store.snapshots(args.vm)]
        protected = {m.snapshot_id for m in manifests if is_protected(store.layout, m.snapshot_id)}
        damage = {
            m.snapshot_id: damage_of(store.layout, store.index, m.snapshot_id) for m in manifests
        }
    if args.json:
        docs = [
            snapshot_doc(m)
            | {"protected": m.snapshot_id in protected, "damaged": damage[m.snapshot_id]}
            for m in manifests
        ]
        print(json.dumps(docs, indent=2))
        return EXIT_OK
    print(
        f"{'ID':<16}  {'TIME (UTC)':<19}  {'VM':<24}  {'LEVEL':<12}  {'DISKS':>5}  {'SIZE':>10}"
        "  PROTECTED  DAMAGED"
    )
    for m in manifests:
        line = (
            f"{m.snapshot_id:<16}  {m.time[:19]:<19}  {m.vm_name[:24]:<24}  {m.level:<12}  "
            f"{len(m.disks):>5}  {human_bytes(m.size):>10}"
            f"  {'yes' if m.snapshot_id in protected else '':<9}"
            + _damage_cell(damage[m.snapshot_id])
        )
        print(line.rstrip())
    return EXIT_OK


def _damage_cell(damage: dict[str, object] | None) -> str:
    """``DAMAGED`` column: what `store verify` found still wrong (healed chunks left out)."""
    if damage is None:
        return ""
    chunks = damage.get("chunks")
    parts = [f"{len(chunks)} chunks"] if isinstance(chunks, list) and chunks else []
    parts += ["DiskMap"] if damage.get("diskmaps") else []
    parts += ["manifest"] if damage.get("manifest") else []
    return f"  yes ({', '.join(parts)})"


def cmd_restore(args: argparse.Namespace) -> int:
    if args.to is None:
        return cmd_restore_vm(args)
    if args.flow != "imageio":
        raise ConfigError(message="restore: --flow applies to a new VM (--config without --to)")
    request = ImageRestoreRequest(args.snapshot, Path(args.to), args.disk, args.image_format)

    async def run(store: Store) -> int:
        target = await _job_store(store)
        try:
            manifest = store.manifest(store.resolve(request.snapshot))
            with ProgressDisplay(f"restore {manifest.vm_name}") as display:
                outcome = await restore_images(target, request, progress=display.update)
        finally:
            await target.pool.aclose()
        for stats in outcome.disks:
            print(stats.summary())
        print(outcome.summary())
        return EXIT_OK if outcome.record.state is State.SUCCEEDED else EXIT_FAILED

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


def cmd_restore_vm(args: argparse.Namespace) -> int:
    """``restore --config`` without ``--to``: the snapshot becomes a new VM on the engine
    (through the daemon when one answers, else ``engine.app.restore`` in this process)."""
    if args.config is None:
        raise ConfigError(message="restore: give --to PATH, or --config to restore a new VM")
    if args.image_format:
        raise ConfigError(message="restore: --format applies to --to PATH only")
    if args.disk and not args.into_vm:
        raise ConfigError(message="restore: --disk needs --to PATH or --into-vm VM")
    request = VmRestoreRequest(
        snapshot=args.snapshot,
        name=args.name,
        cluster=args.cluster,
        storage_domain=args.storage_domain,
        flow=args.flow,
        engine=args.engine,
        disk=args.disk,
        into_vm=args.into_vm,
    )
    if not args.direct and (socket := cli_service.daemon_socket(args.config)) is not None:
        body = {"snapshot": args.snapshot, "name": args.name, "cluster": args.cluster}
        body |= {"storage_domain": args.storage_domain, "flow": args.flow, "engine": args.engine}
        body |= {"disk": args.disk, "into_vm": args.into_vm}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/restores", body))
    config = load_config(args.config, args.config.parent / "conf.d")

    async def run(store: Store) -> int:
        target = await _job_store(store)
        try:
            plan = plan_vm_restore(target, request)
            with ProgressDisplay(f"restore {plan.manifest.vm_name}") as display:
                outcome = await restore_vm(config, target, plan, progress=display.update)
        finally:
            await target.pool.aclose()
        for stats in outcome.restore.disks:
            print(stats.summary())
        print(outcome.restore.summary())
        if outcome.vm is None:
            return EXIT_FAILED  # the plugin deleted what it created
        what = "disks attached to VM" if args.into_vm else "restored VM"
        print(f"{what} {outcome.vm.name} id {outcome.vm.id}")
        return EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


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


LAB_KNOBS = {  # lab up option → the lab engine's Faults field
    "inactivity_timeout": "inactivity_timeout",
    "slow_reads": "storage_iops",
    "phase_seconds": "phase_seconds",
    "disk_seconds": "disk_seconds",
    "ticket_timeout": "ticket_timeout",
}


def cmd_lab(args: argparse.Namespace) -> int:
    action = registry.get("lab").command(args.lab_command)
    if args.lab_command == "up":
        knobs = {
            field: getattr(args, option)
            for option, field in LAB_KNOBS.items()
            if getattr(args, option) is not None
        }
        result = action(
            args.dir.resolve(),
            knobs,
            sso_idle_timeout=args.sso_idle_timeout,
            sso_lifetime=args.sso_lifetime,
        )
    else:
        result = action(args.dir.resolve())
    if args.lab_command == "down":
        print("lab stopped" if result else f"no lab was running in {args.dir}")
        return EXIT_OK
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    engine = result["engine"]
    print(f"engine   {engine['url']} (user {engine['username']}, CA {engine['ca_file']})")
    print(f"config   {args.dir.resolve() / 'tessera.yaml'}")
    for vm in result["vms"]:
        disks = ", ".join(f"{d['alias']} ({d['format']})" for d in vm["disks"])
        print(f"vm       {vm['name']:<20} {disks}")
    return EXIT_OK


def snapshot_doc(m: Manifest) -> dict[str, object]:
    return {
        "id": m.snapshot_id,
        "time": m.time,
        "vm": {"id": m.vm_id, "name": m.vm_name},
        "level": m.level,
        "parent": m.parent,
        "consistency": m.consistency,
        "tags": dict(m.tags),
        "size": m.size,
        "data_bytes": m.data_bytes,
        "disks": [
            {
                "id": d.disk_id,
                "name": d.name,
                "size": d.size,
                "data_bytes": d.data_bytes,
                "attributes": d.attributes,
            }
            for d in m.disks
        ],
    }


def cmd_store_init(args: argparse.Namespace) -> int:
    passphrase = None
    if args.encryption != ENCRYPTION_NONE:
        passphrase = resolve_passphrase(args.passphrase_file, confirm=True)
    config = Store.init(
        args.path,
        chunk_size=args.chunk_size,
        encryption=args.encryption,
        pack_size=args.pack_size,
        key_file=args.key_file,
        passphrase=passphrase,
        zstd_level=args.zstd_level,
    )
    key = args.key_file or args.path / "keys" / "key"
    print(f"created store {args.path} (id {config.store_id})")
    print(
        f"  chunk size {human_bytes(config.chunk_size)}, pack size {human_bytes(config.pack_size)}"
    )
    print(f"  encryption {config.encryption}, zstd level {config.zstd_level}; key file {key}")
    if args.encryption != ENCRYPTION_NONE:
        print("  keep a copy of the key file and the passphrase: without both the data is lost")
    return EXIT_OK


def cmd_store_info(args: argparse.Namespace) -> int:
    with open_store(args, writable=False) as store:
        info = store.info()
    if args.json:
        doc = asdict(info) | {
            "dedup_ratio": info.dedup_ratio,
            "compression_ratio": info.compression_ratio,
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    rows = [
        ("store", f"{info.path} (id {info.store_id})"),
        ("format", f"{info.format}, encryption {info.encryption}, zstd level {info.zstd_level}"),
        ("chunk size", human_bytes(info.chunk_size)),
        ("pack size", human_bytes(info.pack_size)),
        ("snapshots", str(info.snapshots)),
        ("packs", f"{info.packs} ({human_bytes(info.pack_bytes)})"),
        ("chunks", str(info.chunks)),
        ("logical", f"{human_bytes(info.logical_bytes)} referenced by snapshots"),
        ("unique", f"{human_bytes(info.unique_bytes)} after dedup"),
        ("stored", f"{human_bytes(info.stored_bytes)} after compression/encryption"),
        ("dedup ratio", f"{info.dedup_ratio:.2f}"),
        ("compression", f"{info.compression_ratio:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK


def cmd_store_rebuild_index(args: argparse.Namespace) -> int:
    with open_store(args, writable=True) as store:
        report = store.rebuild_index()
        stats = store.index.stats()
    for line in report.lines():
        print(line)
    print(f"index rebuilt: {stats.packs} packs, {stats.chunks} chunks")
    # A missing or damaged index.db / catalog.db is what this command fixes: reported, but
    # not a reason for exit 3. A damaged trailer is (the pack needs `store repair`).
    left = [p for p in report.problems if p not in report.files]
    return EXIT_INTEGRITY if left else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        return 130
    except (sqlite3.Error, OSError) as e:  # a last resort: the store maps what it knows
        where = getattr(args, "path", None) or getattr(args, "store", None) or "tessera"
        reason = describe(e) if isinstance(e, sqlite3.Error) else os_reason(e)
        print(f"tessera: {where}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
