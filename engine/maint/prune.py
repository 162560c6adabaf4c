"""Prune and protect: removing snapshots from a store, and keeping chosen ones from removal.

Removing a snapshot removes its manifest (its commit point) from ``snapshots/`` — never a
chunk or a pack: the chunks it alone referenced become garbage that GC reclaims later. The
snapshot directory is *moved* to ``removed/`` and kept there for GC's grace period, the undo
window of DESIGN §4.9 (``unremove`` moves it back)::

    under the prune lock, per snapshot:
      1. re-check: still committed, not protected, not share-locked by a reader
      2. snapshots/<id>/removal.json   tmp+fsync+rename+fsync dir (who, when, why)
      3. catalog row deleted           the snapshot stops being listed
      4. rename snapshots/<id> → removed/<id>, fsync both dirs   ← the commit point
      (5. GC, after the grace period counted from removal.json's time, deletes removed/<id>
          and may then sweep the chunks only it referenced)

A snapshot exists iff ``snapshots/<id>/manifest`` exists, so step 4's atomic rename is the
one commit point. A crash before it leaves the snapshot in place (a stale removal.json is
deleted by the next prune; a missing catalog row is re-added by the next prune or writable
open, which both reconcile the catalog with the manifests); after it, the removal is
durable and ``removed/<id>/removal.json`` says when it happened. Removing again is a no-op.

Protection is a file, ``snapshots/<id>/protected`` (tmp+fsync+rename, removed with unlink +
fsync dir), not a catalog column: the catalog is a cache rebuilt from the manifests, and a
protection flag must survive that. Prune never removes a protected snapshot.

Snapshots made by hand (manifest tag ``origin: manual``, ``engine.store.manifest``) are
*held* when ``prune(hold_manual=True)`` — what a policy's retention asks unless it says
``include_manual: true``: kept, and not counted by the rules (``retention``). ``tessera
prune``, rules typed by hand, holds nothing.

Locking: prune takes ``STORE/prune.lock`` (an exclusive flock; protect and unprotect take it
too), **not** the store writer lock. Backups hold the writer lock for their whole run, so
prune under the writer lock would wait for every backup — restic's "weekly prune makes hourly
backups fail" the other way round. Prune runs beside a backup safely because:

- it only moves committed snapshot directories, which a backup never writes;
- the catalog is SQLite in WAL mode, written by both processes in short transactions;
- a backup's parent is the VM's newest snapshot (always kept) or, for a differential, the
  newest full (kept as "base of the newest differential"); a snapshot committed after the
  plan was made is not in the plan, so is not removed;
- a restore or verify that share-locks ``snapshots/<id>/manifest`` (``flock(LOCK_SH)``) is
  respected: prune skips that snapshot and says so ("in use"). A reader that does not take
  the lock keeps its already-open files (a rename does not close them), and the data stays
  in ``removed/`` for the grace period.
"""

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import SnapshotNotFound, StoreError, StoreLocked
from engine.maint.retention import Candidate, Decision, Rules, plan
from engine.store.catalog import Catalog
from engine.store.layout import MANIFEST_NAME, Layout, snapshot_lock
from engine.store.manifest import ORIGIN_MANUAL, ORIGIN_TAG
from engine.store.retention import when
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

PRUNE_LOCK: Final = "prune.lock"
REMOVED_DIR: Final = "removed"
REMOVAL_RECORD: Final = "removal.json"
PROTECTED_NAME: Final = "protected"
MANUAL_HELD: Final = "made by hand (the policy's retention.include_manual is off)"


class PruneLocked(StoreLocked):
    template = "store {path}: {reason}"


@contextmanager
def prune_lock(layout: Layout, what: str = "prune") -> Iterator[None]:
    """Hold ``STORE/prune.lock`` exclusively; raises PruneLocked if another holder has it."""
    path = layout.root / PRUNE_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PruneLocked(
                path=layout.root,
                reason=f"cannot {what}: a prune is running (pid {holder}); try again when it ends",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the flock


# --- protection ------------------------------------------------------------------------------


def is_protected(layout: Layout, snapshot_id: str) -> bool:
    return (layout.snapshot_dir(snapshot_id) / PROTECTED_NAME).exists()


def set_protected(store: "Store", snapshot_id: str, protected: bool) -> bool:
    """Protect or unprotect a committed snapshot (id or unique prefix); True if changed.

    Works on a read-only ``Store`` too (it writes one small file, not store data); takes the
    prune lock so it never races a prune's re-check. Raises SnapshotNotFound, PruneLocked.
    """
    layout = store.layout
    with prune_lock(layout, "protect" if protected else "unprotect"):
        sid = store.resolve(snapshot_id)
        if not layout.manifest(sid).exists():
            raise SnapshotNotFound(snapshot=sid, reason="no manifest (removed?)")
        marker = layout.snapshot_dir(sid) / PROTECTED_NAME
        if marker.exists() == protected:
            return False
        if protected:
            doc = {"snapshot": sid, "since": datetime.now(UTC).isoformat(timespec="seconds")}
            atomic_write(marker, json.dumps(doc).encode() + b"\n", "maint.protect")
        else:
            marker.unlink()
            fsync_dir(marker.parent)
        return True


# --- planning --------------------------------------------------------------------------------


def candidates(
    store: "Store", vm: str | None = None, *, hold_manual: bool = False
) -> list[Candidate]:
    """The store's snapshots (of one VM id or name) as retention candidates; with
    ``hold_manual`` those made by hand are held (``MANUAL_HELD``), which reads each
    snapshot's manifest."""

    def held(snapshot_id: str) -> str | None:
        if not hold_manual:
            return None
        origin = store.manifest(snapshot_id).tags.get(ORIGIN_TAG)
        return MANUAL_HELD if origin == ORIGIN_MANUAL else None

    return [
        Candidate(
            snapshot_id=e.snapshot_id,
            vm_id=e.vm_id,
            vm_name=e.vm_name,
            time=datetime.fromisoformat(e.time),
            level=e.level,
            protected=is_protected(store.layout, e.snapshot_id),
            held=held(e.snapshot_id),
        )
        for e in store.snapshots(vm)
    ]


@dataclass
class PruneResult:
    rules: Rules
    decisions: list[Decision]
    dry_run: bool
    removed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # snapshot id → why not removed
    # Snapshot id → until when its objects are locked in the bucket (object lock): kept by
    # design, not a failure.
    locked: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def to_remove(self) -> list[Decision]:
        return [d for d in self.decisions if not d.keep]


def prune(
    store: "Store",
    rules: Rules,
    *,
    vm: str | None = None,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    dry_run: bool = False,
    hold_manual: bool = False,
) -> PruneResult:
    """Plan with ``rules`` and (unless ``dry_run``) remove what no rule keeps;
    ``hold_manual`` keeps the snapshots made by hand out of it (module docstring).

    ``store`` may be read-only (the CLI opens it so, to run beside a backup that holds the
    writer lock); the catalog is then written through a connection of our own. Raises
    ValueError for empty or invalid rules, PruneLocked if another prune runs.
    """
    rules.validate()
    if rules.empty():
        raise ValueError(
            "no keep rules given: prune would remove every snapshot but the newest of "
            "each VM; give at least one --keep-* option"
        )
    now = now or datetime.now(UTC)
    with prune_lock(store.layout), _catalog(store) as catalog:
        result = PruneResult(rules, [], dry_run)
        if not dry_run:
            result.notes += _roll_back_stale_records(store.layout)
        added, removed = catalog.reconcile(store.layout.committed_snapshots(), store.manifest)
        if added or removed:
            result.notes.append(f"catalog reconciled with manifests: +{added} -{removed}")
        result.decisions = plan(candidates(store, vm, hold_manual=hold_manual), rules, now, tz)
        locked = _locked(store.layout, result.to_remove, now)
        result.locked.update(locked)
        if dry_run:
            return result
        for d in result.to_remove:
            if d.snapshot_id in locked:
                continue
            why = _remove_one(store.layout, catalog, d, rules)
            if why is None:
                result.removed.append(d.snapshot_id)
                store.snapshot_removed(d.snapshot_id)
            else:
                result.skipped[d.snapshot_id] = why
        return result


def _locked(layout: Layout, decisions: list[Decision], now: datetime) -> dict[str, str]:
    """Snapshots the rules would remove whose objects in a bucket with object lock are
    locked past ``now`` (``engine.store.retention``): kept, saying until when."""
    out = {}
    for d in decisions:
        until = snapshot_lock(layout.snapshot_dir(d.snapshot_id))
        if until is not None and until > now.timestamp():
            out[d.snapshot_id] = f"object lock: kept in the bucket until {when(until)}"
    return out


@contextmanager
def _catalog(store: "Store") -> Iterator[Catalog]:
    if store.writable:
        yield store.catalog
        return
    catalog = Catalog(store.layout.catalog)
    try:
        yield catalog
    finally:
        catalog.close()


def _roll_back_stale_records(layout: Layout) -> list[str]:
    """Delete removal records of snapshots still in ``snapshots/`` (a crash before step 4)."""
    notes = []
    for record in sorted(layout.snapshots.glob(f"*/{REMOVAL_RECORD}")):
        record.unlink()
        fsync_dir(record.parent)
        notes.append(f"snapshot {record.parent.name}: an interrupted removal was rolled back")
    return notes


def _remove_one(layout: Layout, catalog: Catalog, d: Decision, rules: Rules) -> str | None:
    """Remove one snapshot (steps 1–4 above); None if removed, else why it was not."""
    sid = d.snapshot_id
    src = layout.snapshot_dir(sid)
    if is_protected(layout, sid):
        return "protected meanwhile"
    try:
        fd = os.open(src / MANIFEST_NAME, os.O_RDONLY)
    except FileNotFoundError:
        catalog.remove(sid)
        return "already gone"
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "in use by a restore or verify"
        record = {
            "snapshot": sid,
            "vm_id": d.vm_id,
            "vm_name": d.vm_name,
            "time": d.time.isoformat(),
            "removed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "reasons": list(d.reasons),
            "rules": rules.describe(),
            "pid": os.getpid(),
        }
        atomic_write(src / REMOVAL_RECORD, json.dumps(record).encode() + b"\n", "maint.removal")
        catalog.remove(sid)
        dest_dir = layout.root / REMOVED_DIR
        if not dest_dir.exists():
            dest_dir.mkdir()
            fsync_dir(layout.root)
        dest = dest_dir / sid
        if dest.exists():
            raise StoreError(
                path=layout.root,
                reason=f"cannot remove snapshot {sid} of VM {d.vm_name}: {dest} already exists",
            )
        os.rename(src, dest)  # the commit point
        fsync_dir(dest_dir)
        fsync_dir(layout.snapshots)
    finally:
        os.close(fd)
    return None


# --- removed snapshots (the undo window) -----------------------------------------------------


@dataclass(frozen=True)
class RemovedSnapshot:
    snapshot_id: str
    vm_name: str
    removed_at: datetime | None  # None if the record is unreadable (GC: treat as just now)
    path: Path


def removed_snapshots(layout: Layout) -> list[RemovedSnapshot]:
    """Snapshots in ``removed/`` (kept for GC's grace period), oldest removal first."""
    out = []
    root = layout.root / REMOVED_DIR
    if not root.exists():
        return []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        try:
            doc = json.loads((d / REMOVAL_RECORD).read_bytes())
            at: datetime | None = datetime.fromisoformat(doc["removed_at"])
            vm_name = str(doc.get("vm_name", "?"))
        except (OSError, ValueError, KeyError):
            at, vm_name = None, "?"
        out.append(RemovedSnapshot(d.name, vm_name, at, d))
    return sorted(out, key=lambda r: r.removed_at or datetime.max.replace(tzinfo=UTC))


def unremove(store: "Store", snapshot_id: str) -> None:
    """Undo a removal still in the grace period: the snapshot is listed again.

    Raises SnapshotNotFound if it is not in ``removed/`` (GC may have deleted it).
    """
    layout = store.layout
    with prune_lock(layout, "undo a removal"), _catalog(store) as catalog:
        src = layout.root / REMOVED_DIR / snapshot_id
        if not (src / MANIFEST_NAME).exists():
            raise SnapshotNotFound(snapshot=snapshot_id, reason="not among removed snapshots")
        dest = layout.snapshot_dir(snapshot_id)
        os.rename(src, dest)  # commit point of the undo
        fsync_dir(layout.snapshots)
        fsync_dir(src.parent)
        record = dest / REMOVAL_RECORD
        record.unlink(missing_ok=True)
        fsync_dir(dest)
        catalog.add(store.manifest(snapshot_id))
        store.snapshot_restored(snapshot_id)
