"""Restore verification: prove a restore point usable without restoring it or touching the
VM, and record the verdict beside the snapshot.

::

    check(store, snapshot, disks, expect)            the snapshot share-locked, a CPU pool
      └─ check_snapshot ─► GuestTree.open (exports + appliance; every filesystem mounted
                           read-only, journals replayed into qemu's throwaway overlay)
                           └─ tree.check(expect) ─► per filesystem: unmount, its checker
                              in no-write mode (engine.restore.fsck), mount read-only again;
                              then each expected path looked up
                    ─► CheckRecord (passed | failed | error) ─► snapshots/<id>/restore-check.json

A check *passes* when at least one filesystem was found, none failed its checker or its
mount, and every expected path is there; it *fails* otherwise, each problem named
(``sda1 (ext4): e2fsck -f -n: exit 4 …``, ``missing /sda1/etc/hostname``); it is an *error*
when the appliance could not run (no boot in time, the helper died): the record says so,
since an unproven restore point is worth knowing about too. A missing libguestfs raises
``ConfigError`` and records nothing (the machine is at fault, not the snapshot).

The store is only read: the exports are read-only, the record is the one file written
(``engine.restore.record``), and the manifest is never touched. A record that cannot be
written (ENOSPC, EIO) raises ``RecordNotSaved`` carrying the verdict: the check's finding is
never lost with its file.
"""

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import PurePosixPath

import structlog

from engine.core.errors import ConfigError, SnapshotNotFound
from engine.restore.files import ApplianceError, GuestTree
from engine.restore.record import CheckRecord, Outcome, RecordNotSaved, write_record
from engine.restore.tree import FsCheck, PathCheck
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.util import failpoints
from engine.workers import make_cpu_pool
from engine.workers.pool import CpuPool

log = structlog.get_logger("tessera.check")


async def check(
    store: Store,
    snapshot: str,
    *,
    disks: Sequence[str] = (),
    expect: Sequence[str] = (),
    launch_timeout: float | None = None,
    pool: CpuPool | None = None,
) -> CheckRecord:
    """Check ``snapshot`` (id or unique prefix) of ``store`` — only ``disks`` (ids or names)
    when given — and record the result; the snapshot is share-locked meanwhile (prune skips
    it). ``pool`` decodes (the caller's, left open: the daemon's store pool); without one a
    pool of its own. Raises SnapshotNotFound, ConfigError, RecordNotSaved (with the record)."""
    check_expected(expect)
    snapshot_id = store.resolve(snapshot)
    manifest = store.manifest(snapshot_id)
    chosen = select(manifest, disks)
    with store.reading_snapshot(snapshot_id):
        own = pool is None
        decode = make_cpu_pool(store.keys, manifest.chunk_size) if pool is None else pool
        try:
            return await check_snapshot(
                store, decode, manifest, chosen, expect=expect, launch_timeout=launch_timeout
            )
        finally:
            if own:
                await decode.aclose()


def check_expected(paths: Sequence[str]) -> None:
    """ConfigError unless each of ``paths`` is an absolute path of the tree that starts with
    a filesystem's directory (``/sda1/etc/hostname``); called before anything boots."""
    for path in paths:
        p = PurePosixPath(path)
        if not p.is_absolute() or ".." in p.parts or len(p.parts) < 2:
            raise ConfigError(
                message=f"expected path {path!r}: give an absolute path of the tree, "
                "starting with its filesystem (/sda1/etc/hostname)"
            )


def select(manifest: Manifest, wanted: Sequence[str]) -> list[DiskEntry]:
    """The disks of ``manifest`` named (id or name) in ``wanted``, in the manifest's order;
    all when it is empty. Raises SnapshotNotFound naming a disk it does not have."""
    for name in wanted:
        if not any(name in (d.disk_id, d.name) for d in manifest.disks):
            have = ", ".join(d.name for d in manifest.disks)
            raise SnapshotNotFound(
                snapshot=manifest.snapshot_id, reason=f"no disk {name!r} (has: {have})"
            )
    return [d for d in manifest.disks if not wanted or d.disk_id in wanted or d.name in wanted]


async def check_snapshot(
    store: Store,
    pool: CpuPool,
    manifest: Manifest,
    disks: Sequence[DiskEntry],
    *,
    expect: Sequence[str] = (),
    launch_timeout: float | None = None,
) -> CheckRecord:
    """Check ``disks`` of ``manifest`` in an appliance and write the record (module
    docstring). The caller holds the snapshot's share lock and owns store and pool. Raises
    RecordNotSaved (its ``record`` the verdict) when the record cannot be written."""
    started = datetime.now(UTC)
    clock = time.monotonic()
    filesystems: list[FsCheck] = []
    paths: list[PathCheck] = []
    error = ""
    try:
        async with GuestTree.open(
            store, pool, manifest, disks, launch_timeout=launch_timeout
        ) as tree:
            failpoints.hit("restore.check.appliance_up")  # crash tests: a kill mid-check
            filesystems, paths = await tree.check(expect)
    except ApplianceError as e:
        error = str(e)
    problems = _problems(filesystems, paths) if not error else []
    outcome: Outcome = "error" if error else ("failed" if problems else "passed")
    record = CheckRecord(
        snapshot=manifest.snapshot_id,
        time=started.isoformat(timespec="seconds"),
        outcome=outcome,
        duration=round(time.monotonic() - clock, 1),
        version=_version(),
        disks=[d.name for d in disks],
        filesystems=filesystems,
        paths=paths,
        problems=problems,
        error=error,
    )
    log.info(
        "check.done",
        snapshot=record.snapshot,
        outcome=outcome,
        problems=problems,
        error=error or None,
        seconds=record.duration,
    )
    try:
        write_record(store.layout, record)
    except RecordNotSaved as e:
        log.warning("check.record_not_saved", snapshot=record.snapshot, error=str(e))
        raise
    return record


def _problems(filesystems: Sequence[FsCheck], paths: Sequence[PathCheck]) -> list[str]:
    out = [f"{f.name} ({f.fstype}): {f.problem}" for f in filesystems if f.state == "failed"]
    out += [
        f"missing {p.path}" + (f" ({p.problem})" if p.problem else "")
        for p in paths
        if not p.present
    ]
    if not filesystems:
        out.append("no filesystem found on the disks checked")
    return out


def _version() -> str:
    try:
        return version("tessera")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"
