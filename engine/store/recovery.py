"""Open = recover: what a writer does to a store before using it.

Runs under the writer lock, before any job, so nothing it removes can be in use:

1. temp files (``*.tmp``: the open pack, DiskMaps and manifests being written) are deleted —
   nothing half-written is ever served;
2. index rows whose pack file is missing or has a different size are dropped and reported;
3. a pack GC was retiring (linked into ``trash/``) is finished: if the index still lists it
   the GC did not commit and the trash link goes; if not, the GC committed and the copy in
   ``packs/`` goes;
4. sealed packs the index does not know (a crash between seal and index commit) are indexed
   from their trailers; when a trailer is damaged or missing, from a scan of the records
   (``scan``: every record whose CRC — and, with the data key, AEAD and id — holds is kept),
   reported once with what was lost; the next ``repair`` re-seals it (then verify is clean).
   Only a pack without a single intact record stays unindexed, for repair to quarantine.
   A pack repair was replacing (its note in ``quarantine/`` names a replacement that is on
   disk) is moved into the quarantine instead: repair's index commit happened or the
   replacement, indexed here, holds every intact record;
5. snapshot directories without a manifest (a crash before the commit point) are deleted;
6. the catalog is reconciled with the manifests on disk.

A store whose packs live in a bucket (``remote``) recovers steps 2-4 against the bucket's
listing instead of ``packs/``, which is only its cache: ``engine.store.remote`` says how.

(The SQLite files themselves — a missing or damaged ``index.db`` or ``catalog.db`` — are
dealt with by ``Store.open`` before this runs: see ``dbfiles``.)
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import CorruptPack, PackExists
from engine.store.catalog import Catalog
from engine.store.index import Index
from engine.store.layout import Layout
from engine.store.manifest import Manifest
from engine.store.pack import PACK_SUFFIX, SealedPack, read_trailer
from engine.store.scan import Decode, PackScan, scan_pack
from engine.util.fs import fsync_dir, remove_tmp_files

if TYPE_CHECKING:
    from engine.store.remote import PackCache


@dataclass
class RecoveryReport:
    removed_temp_files: list[str] = field(default_factory=list)
    uploaded_packs: list[str] = field(default_factory=list)  # sealed here, put by recovery
    removed_uploads: list[str] = field(default_factory=list)  # objects of killed uploads
    unhidden: list[str] = field(default_factory=list)  # keys a delete marker hid (object lock)
    dropped_cache: list[str] = field(default_factory=list)  # cached copies of another size
    uploaded_snapshots: list[str] = field(default_factory=list)  # put in the bucket late
    dropped_packs: list[str] = field(default_factory=list)  # "name: reason, N chunks"
    indexed_packs: list[str] = field(default_factory=list)
    gc_finished: list[str] = field(default_factory=list)  # "pack N: ..." (a GC was killed)
    unreadable_packs: list[str] = field(default_factory=list)
    scanned: list[PackScan] = field(default_factory=list)  # indexed by scanning records
    quarantine_finished: list[str] = field(default_factory=list)  # a repair was killed
    files: list[str] = field(default_factory=list)  # index.db / catalog.db missing, rebuilt
    discarded_snapshots: list[str] = field(default_factory=list)
    catalog_added: int = 0
    catalog_removed: int = 0

    @property
    def problems(self) -> list[str]:
        """Findings an operator must hear about (the rest is routine crash cleanup)."""
        return (
            list(self.files)
            + [
                f"{k}: deleted in the bucket but kept by its object lock; made visible again"
                for k in self.unhidden
            ]
            + [f"dropped index entries of pack {p}" for p in self.dropped_packs]
            + [scanned_line(s) for s in self.scanned]
            + [f"unreadable pack {p}" for p in self.unreadable_packs]
        )

    def lines(self) -> list[str]:
        out = [f"removed temp file {p}" for p in self.removed_temp_files]
        out += [f"uploaded pack {p} (sealed before a crash)" for p in self.uploaded_packs]
        out += [f"deleted object of an unfinished upload: pack {p}" for p in self.removed_uploads]
        out += [f"dropped cached copy {p}" for p in self.dropped_cache]
        out += [f"put snapshot {s} in the bucket" for s in self.uploaded_snapshots]
        out += [f"indexed pack {p} from its trailer" for p in self.indexed_packs]
        out += self.gc_finished
        out += [
            f"pack {p}: interrupted repair finished (moved to quarantine)"
            for p in self.quarantine_finished
        ]
        out += [f"discarded uncommitted snapshot {s}" for s in self.discarded_snapshots]
        out += self.problems
        if self.catalog_added or self.catalog_removed:
            out.append(f"catalog: +{self.catalog_added} -{self.catalog_removed} snapshots")
        return out


def scanned_line(scan: PackScan) -> str:
    lost = "; ".join(f"lost {x.line()}" for x in scan.lost)
    return (
        f"pack {scan.name}: damaged trailer ({scan.trailer}): indexed {len(scan.entries)} "
        f"intact records by scanning them"
        + (f"; {lost}" if lost else "")
        + " (`tessera store repair` "
        "re-seals it)"
    )


def recover(
    layout: Layout,
    index: Index,
    catalog: Catalog,
    load: Callable[[str], Manifest],
    decode: Decode | None = None,
    remote: "PackCache | None" = None,
) -> RecoveryReport:
    """Recover as the module docstring says. ``decode`` (the store's codec, when it holds
    the data key) also checks the records of a pack indexed by scanning. ``remote``: the
    packs live in that bucket (``engine.store.remote``)."""
    report = RecoveryReport()
    report.removed_temp_files = [
        str(p.relative_to(layout.root)) for p in remove_tmp_files(layout.root)
    ]
    if remote is not None:
        _recover_remote(layout, index, remote, decode, report)
    else:
        _recover_local(layout, index, decode, report)

    if layout.snapshots.exists():
        for d in sorted(layout.snapshots.iterdir()):
            if d.is_dir() and not (d / "manifest").exists():
                shutil.rmtree(d)
                report.discarded_snapshots.append(d.name)
    report.catalog_added, report.catalog_removed = catalog.reconcile(
        layout.committed_snapshots(), load
    )
    if remote is not None:
        _finish_bucket_copies(layout, remote, report)
    return report


def _finish_bucket_copies(layout: Layout, remote: "PackCache", report: RecoveryReport) -> None:
    """A store in a bucket: its configuration and key file are there (an init that failed
    to put them), and every committed snapshot (a put that failed or was killed)."""
    from engine.store.remote import (  # noqa: PLC0415
        publish_store,
        put_snapshot,
        store_published,
        unsent_snapshots,
    )

    if not store_published(layout):
        publish_store(remote.objects, layout, layout.default_key_file)
    for sid in unsent_snapshots(layout):
        put_snapshot(remote.objects, layout, sid)
        report.uploaded_snapshots.append(sid)


def _recover_local(
    layout: Layout, index: Index, decode: Decode | None, report: RecoveryReport
) -> None:
    on_disk = layout.pack_files()
    for row in index.packs():
        path = on_disk.get(row.name)
        size = path.stat().st_size if path is not None else None
        if size != row.size:
            reason = "missing" if size is None else f"{size} bytes, expected {row.size}"
            n = index.drop_pack(row.name)
            report.dropped_packs.append(f"{row.name} ({reason}, {n} chunks)")
            on_disk.pop(row.name, None)
    known = {row.name for row in index.packs()}
    for name, trashed in sorted(layout.trash_files().items()):
        if name in known:  # the GC that linked it there did not commit: the pack stays
            trashed.unlink()
            fsync_dir(trashed.parent)
            report.gc_finished.append(f"pack {name}: interrupted GC undone (trash link removed)")
        elif name in on_disk:  # the GC committed: finish moving the pack to the trash
            stale = on_disk.pop(name)
            stale.unlink()
            fsync_dir(stale.parent)
            report.gc_finished.append(f"pack {name}: interrupted GC finished (moved to trash)")
    unindexed = {name: on_disk[name] for name in set(on_disk) - known}
    replaced = _replaced_by_repair(layout, unindexed)
    index_packs(index, {n: p for n, p in unindexed.items() if n not in replaced}, decode, report)
    for name in sorted(replaced):
        _finish_quarantine(layout, name, unindexed[name])
        report.quarantine_finished.append(name)


def _recover_remote(
    layout: Layout, index: Index, remote: "PackCache", decode: Decode | None, report: RecoveryReport
) -> None:
    """Steps 2-4 for packs in a bucket (``engine.store.remote`` lists what they do)."""
    if remote.objects.lock is not None:  # before anything is judged missing
        report.unhidden = remote.objects.unhide()
    in_bucket = {p.name: p.size for p in remote.objects.list()}
    cached = layout.pack_files()
    trashed = layout.trash_files()
    quarantined = (
        {p.stem for p in layout.quarantine.glob("*.json")} if layout.quarantine.exists() else set()
    )
    known = {row.name for row in index.packs()}
    # Sealed here, never indexed: upload (its own earlier upload counts) so step 4 indexes it.
    for name, path in sorted(cached.items()):
        if name in known or name in trashed or name in quarantined:
            continue
        local_size = path.stat().st_size
        if in_bucket.get(name) == local_size:
            continue
        index.intend_upload(name, int(path.stat().st_mtime))
        try:
            remote.upload(name)
        except PackExists:  # the bucket's pack of that name is the one indexed below
            remote.forget(name)
            cached.pop(name)
            report.dropped_cache.append(f"{name} ({local_size} bytes, another in the bucket)")
            continue
        in_bucket[name] = local_size
        report.uploaded_packs.append(name)
    for row in index.packs():
        size: int | None = in_bucket.get(row.name)
        if size != row.size:
            reason = "missing" if size is None else f"{size} bytes, expected {row.size}"
            n = index.drop_pack(row.name)
            report.dropped_packs.append(f"{row.name} ({reason} in {remote.where}, {n} chunks)")
            known.discard(row.name)
        copy = cached.get(row.name)
        if copy is not None and (size != row.size or copy.stat().st_size != row.size):
            remote.forget(row.name)
            cached.pop(row.name)
            report.dropped_cache.append(
                f"{row.name} ({copy.stat().st_size if copy.exists() else 0} bytes)"
            )
    for name, trash in sorted(trashed.items()):
        if name in known:  # the GC that left the marker did not commit: the pack stays
            trash.unlink()
            fsync_dir(trash.parent)
            report.gc_finished.append(f"pack {name}: interrupted GC undone (trash marker removed)")
        elif name in cached:  # the GC committed: the cached copy goes, the object waits
            remote.forget(name)
            cached.pop(name)
            report.gc_finished.append(f"pack {name}: interrupted GC finished (moved to trash)")
    _end_killed_uploads(layout, index, remote, known, cached, in_bucket, report)
    unknown = {n for n in in_bucket if n not in known and n not in trashed and n not in quarantined}
    index_remote(index, remote, unknown, decode, report, in_bucket)


def _end_killed_uploads(
    layout: Layout,
    index: Index,
    remote: "PackCache",
    known: set[str],
    cached: dict[str, Path],
    in_bucket: dict[str, int],
    report: RecoveryReport,
) -> None:
    """Intents of packs neither indexed nor cached (a killed upload): their objects are
    deleted — with object lock the bucket keeps them until their dates, and a GC trash
    marker each has GC delete them then. Intents of indexed packs are cleared."""
    from engine.store.remote import leave_for_gc  # noqa: PLC0415 - botocore: only for a bucket

    stale = [n for n in index.uploads() if n not in known and n not in cached]
    if stale:
        locked = remote.objects.delete(stale)
        if locked:
            leave_for_gc(layout, index, remote.objects, locked)
        report.removed_uploads += sorted(stale)
        for name in stale:
            in_bucket.pop(name, None)
    index.end_upload([*stale, *(n for n in index.uploads() if n in known)])


def index_remote(
    index: Index,
    remote: "PackCache",
    names: set[str] | None,
    decode: Decode | None,
    report: RecoveryReport,
    sizes: dict[str, int] | None = None,
) -> None:
    """Index packs of a bucket from their trailers (one ranged GET of each tail); a pack
    whose trailer is damaged is fetched into the cache and scanned (``index_packs``).
    ``names`` None: every pack in the bucket (a read-only open rebuilding its index)."""
    from engine.store.objects import read_trailer as read_remote_trailer  # noqa: PLC0415

    if sizes is None:
        sizes = {p.name: p.size for p in remote.objects.list()}
    if names is None:
        names = set(sizes)
    damaged = {}
    for name in sorted(names):
        try:
            size, entries = read_remote_trailer(remote.objects, name)
        except CorruptPack:
            damaged[name] = remote.local(name, sizes[name])
            continue
        index.add_pack(SealedPack(name, size, entries))
        report.indexed_packs.append(name)
    index_packs(index, damaged, decode, report)


def index_packs(
    index: Index, packs: dict[str, Path], decode: Decode | None, report: RecoveryReport
) -> None:
    """Index each of ``packs`` from its trailer or, when that is damaged, from a scan of its
    records; a pack without one intact record is reported unreadable and left alone."""
    for name in sorted(packs):
        try:
            size, entries = read_trailer(packs[name], name)
        except CorruptPack as e:
            try:
                scan = scan_pack(packs[name], name, decode)
            except CorruptPack as unreadable:
                report.unreadable_packs.append(f"{name} ({unreadable.fields['reason']})")
                continue
            if not scan.entries:
                report.unreadable_packs.append(
                    f"{name} ({e.fields['reason']}; no intact record found by scanning)"
                )
                continue
            scan.trailer = scan.trailer or str(e.fields["reason"])
            index.add_pack(SealedPack(name, scan.size, scan.entries))
            report.scanned.append(scan)
            continue
        index.add_pack(SealedPack(name, size, entries))
        report.indexed_packs.append(name)


def _replaced_by_repair(layout: Layout, unindexed: dict[str, Path]) -> set[str]:
    """Unindexed packs with a quarantine note naming a replacement pack that is on disk."""
    out = set()
    for name in unindexed:
        try:
            note = json.loads((layout.quarantine / f"{name}.json").read_bytes())
        except (OSError, ValueError):
            continue
        new = note.get("replaced_by") if isinstance(note, dict) else None
        if isinstance(new, str) and new != name and new in layout.pack_files():
            out.add(name)
    return out


def _finish_quarantine(layout: Layout, name: str, path: Path) -> None:
    target = layout.quarantine / f"{name}{PACK_SUFFIX}"
    os.rename(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)
