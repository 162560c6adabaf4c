"""Open = recover: what a writer does to a store before using it.

Runs under the writer lock, before any job, so nothing it removes can be in use:

1. temp files (``*.tmp``: the open pack, DiskMaps and manifests being written) are deleted —
   nothing half-written is ever served;
2. index rows whose pack file is missing or has a different size are dropped and reported;
3. a pack GC was retiring (linked into ``trash/``) is finished: if the index still lists it
   the GC did not commit and the trash link goes; if not, the GC committed and the copy in
   ``packs/`` goes;
4. sealed packs the index does not know (a crash between seal and index commit) are indexed
   from their trailers; a pack whose trailer cannot be read is reported and left for repair;
5. snapshot directories without a manifest (a crash before the commit point) are deleted;
6. the catalog is reconciled with the manifests on disk.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.errors import CorruptPack
from engine.store.catalog import Catalog
from engine.store.index import Index
from engine.store.layout import Layout
from engine.store.manifest import Manifest
from engine.store.pack import SealedPack, read_trailer
from engine.util.fs import fsync_dir, remove_tmp_files


@dataclass
class RecoveryReport:
    removed_temp_files: list[str] = field(default_factory=list)
    dropped_packs: list[str] = field(default_factory=list)  # "name: reason, N chunks"
    indexed_packs: list[str] = field(default_factory=list)
    gc_finished: list[str] = field(default_factory=list)  # "pack N: ..." (a GC was killed)
    unreadable_packs: list[str] = field(default_factory=list)
    discarded_snapshots: list[str] = field(default_factory=list)
    catalog_added: int = 0
    catalog_removed: int = 0

    @property
    def problems(self) -> list[str]:
        """Findings an operator must hear about (the rest is routine crash cleanup)."""
        return [f"dropped index entries of pack {p}" for p in self.dropped_packs] + [
            f"unreadable pack {p}" for p in self.unreadable_packs
        ]

    def lines(self) -> list[str]:
        out = [f"removed temp file {p}" for p in self.removed_temp_files]
        out += [f"indexed pack {p} from its trailer" for p in self.indexed_packs]
        out += self.gc_finished
        out += [f"discarded uncommitted snapshot {s}" for s in self.discarded_snapshots]
        out += self.problems
        if self.catalog_added or self.catalog_removed:
            out.append(f"catalog: +{self.catalog_added} -{self.catalog_removed} snapshots")
        return out


def recover(
    layout: Layout, index: Index, catalog: Catalog, load: Callable[[str], Manifest]
) -> RecoveryReport:
    report = RecoveryReport()
    report.removed_temp_files = [
        str(p.relative_to(layout.root)) for p in remove_tmp_files(layout.root)
    ]

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
    for name in sorted(set(on_disk) - known):
        try:
            size, entries = read_trailer(on_disk[name], name)
        except CorruptPack as e:
            report.unreadable_packs.append(f"{name} ({e.fields['reason']})")
            continue
        index.add_pack(SealedPack(name, size, entries))
        report.indexed_packs.append(name)

    if layout.snapshots.exists():
        for d in sorted(layout.snapshots.iterdir()):
            if d.is_dir() and not (d / "manifest").exists():
                shutil.rmtree(d)
                report.discarded_snapshots.append(d.name)
    report.catalog_added, report.catalog_removed = catalog.reconcile(
        layout.committed_snapshots(), load
    )
    return report
