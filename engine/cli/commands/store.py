"""What ``tessera store init|info|rebuild-index`` and ``tessera snapshots`` run (their
options: ``engine.cli.main``)."""

import argparse
import json
import os
from dataclasses import asdict

from engine.app.passphrase import resolve_passphrase
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_INTEGRITY, EXIT_OK
from engine.cli.times import WIDTH as TIME_WIDTH
from engine.cli.times import human_time
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.maint.prune import is_protected
from engine.restore.record import read_record, record_cell
from engine.store.chunk_store import Store
from engine.store.damage import damage_of
from engine.store.layout import ENCRYPTION_NONE, RemoteConfig
from engine.store.manifest import Manifest
from engine.store.retention import describe_duration, parse_duration


def cmd_store_init(args: argparse.Namespace) -> int:
    remote, s3_key = _remote(args)
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
        remote=remote,
        s3_key=s3_key,
    )
    key = args.key_file or args.path / "keys" / "key"
    print(f"created store {args.path} (id {config.store_id})")
    if remote is not None:
        print(
            f"  packs in {remote.url} at {remote.endpoint}; cache of "
            f"{human_bytes(remote.cache_bytes)} in {args.path / 'packs'}"
        )
        if remote.lock is not None:
            print(
                f"  object lock {remote.lock.mode}: every snapshot kept at least "
                f"{describe_duration(remote.lock.seconds)} from its backup"
            )
    print(
        f"  chunk size {human_bytes(config.chunk_size)}, pack size {human_bytes(config.pack_size)}"
    )
    print(f"  encryption {config.encryption}, zstd level {config.zstd_level}; key file {key}")
    if args.encryption != ENCRYPTION_NONE:
        print("  keep a copy of the key file and the passphrase: without both the data is lost")
    return EXIT_OK


def cmd_store_attach(args: argparse.Namespace) -> int:
    remote, s3_key = _remote(args)
    assert remote is not None  # --s3 and --s3-endpoint are required options
    assert s3_key is not None
    config = Store.attach(args.path, remote, s3_key)
    print(f"attached store {args.path} (id {config.store_id}) to {remote.url} at {remote.endpoint}")
    with open_store(args, writable=True) as store:  # rebuilds the index and catalog
        info = store.info()
    print(f"  {info.snapshots} snapshots, {info.packs} packs ({human_bytes(info.pack_bytes)})")
    return EXIT_OK


def cmd_store_break_lock(args: argparse.Namespace) -> int:
    held = Store.break_bucket_lock(args.path)
    print("no writer lock in the bucket" if held is None else f"removed the lock of {held}")
    return EXIT_OK


def _remote(args: argparse.Namespace) -> tuple[RemoteConfig | None, tuple[str, str] | None]:
    if args.s3 is None:
        if args.s3_endpoint is not None:
            raise ConfigError(message=f"store {args.store_command}: --s3-endpoint needs --s3")
        return None, None
    if args.s3_endpoint is None:
        raise ConfigError(message=f"store {args.store_command}: --s3 needs --s3-endpoint URL")
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise ConfigError(
            message=f"store {args.store_command} --s3: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY to the "
            "bucket's key (it is kept in the store's keys/s3.json, readable by its owner only)"
        )
    bucket, prefix = args.s3
    mode, seconds = _object_lock(args)
    remote = RemoteConfig(
        args.s3_endpoint,
        bucket,
        prefix,
        args.s3_region,
        args.cache_size,
        requests_per_second=args.s3_requests_per_second,
        requests_per_month=args.s3_requests_per_month,
        object_lock=mode,
        lock_seconds=seconds,
    )
    return remote, (access, secret)


def _object_lock(args: argparse.Namespace) -> tuple[str, int]:
    mode, duration = getattr(args, "object_lock", None), getattr(args, "lock_for", None)
    if mode is None and duration is None:
        return "", 0
    if mode is None or duration is None:
        raise ConfigError(message="store init: --object-lock and --lock-for go together")
    try:
        return mode.upper(), parse_duration(duration)
    except ValueError as e:
        raise ConfigError(message=f"store init --lock-for: {e}") from None


def cmd_store_info(args: argparse.Namespace) -> int:
    """The configuration and the counts of the index and catalog need no key (issue 16:
    showing the chunk size asked for the passphrase); only a store whose index or catalog
    must first be rebuilt from the packs is opened with it."""
    info = Store.keyless_info(args.path)
    if info is None:
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
        *([("packs in", info.packs_in)] if info.packs_in else []),
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


def cmd_snapshots(args: argparse.Namespace) -> int:
    if args.store is None and args.config is None:
        raise ConfigError(message="snapshots: one of --store or --config is required")
    with open_store(args, writable=False) as store:
        manifests = [store.manifest(e.snapshot_id) for e in store.snapshots(args.vm)]
        protected = {m.snapshot_id for m in manifests if is_protected(store.layout, m.snapshot_id)}
        damage = {
            m.snapshot_id: damage_of(store.layout, store.index, m.snapshot_id) for m in manifests
        }
        checks = {m.snapshot_id: read_record(store.layout, m.snapshot_id) for m in manifests}
    if args.json:
        docs = []
        for m in manifests:
            record = checks[m.snapshot_id]
            docs.append(
                snapshot_doc(m)
                | {"protected": m.snapshot_id in protected, "damaged": damage[m.snapshot_id]}
                | {"check": record.doc() if record is not None else None}
            )
        print(json.dumps(docs, indent=2))
        return EXIT_OK
    print(
        f"{'ID':<16}  {'TIME':<{TIME_WIDTH}}  {'VM':<24}  {'LEVEL':<12}  {'DISKS':>5}  {'SIZE':>10}"
        f"  {'CHECKED':<17}  PROTECTED  DAMAGED"
    )
    for m in manifests:
        line = (
            f"{m.snapshot_id:<16}  {human_time(m.time)}  {m.vm_name[:24]:<24}  {m.level:<12}  "
            f"{len(m.disks):>5}  {human_bytes(m.size):>10}"
            f"  {record_cell(checks[m.snapshot_id]):<17}"
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
