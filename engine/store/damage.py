"""Damage marks: what verify found wrong with a snapshot, kept beside it until it heals.

A snapshot found damaged carries ``snapshots/<id>/damaged`` (JSON, written atomically by
``engine.maint.verify``): the bad or missing chunk ids with the reasons, the DiskMaps that
failed, or the manifest's failure. The chunk ids are also in the index's ``bad_chunks``
list, so the next backup that produces a chunk's data stores it again; the store then
*heals* the chunk (``Index.add_pack``) and ``clear_healed`` drops it from the marks — a
snapshot whose marks are all healed is no longer damaged. A mark is only ever a claim to
re-check: ``damage_of`` reports the listed chunks that are still bad or missing.

The store uses this module itself (``Store`` clears healed chunks from the marks after every
pack it indexes); the checker that finds the damage reads through the store and sits above
it, in ``engine.maint.check``. Nothing here imports ``chunk_store``.
"""

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from engine.store.index import Index
from engine.store.layout import Layout
from engine.util.fs import atomic_write, fsync_dir

DAMAGED_NAME: Final = "damaged"


@dataclass
class Damage:
    """What is wrong with one snapshot (what its mark records)."""

    vm_id: str = ""
    vm_name: str = ""
    chunks: set[bytes] = field(default_factory=set)  # bad or missing chunk ids
    diskmaps: dict[str, str] = field(default_factory=dict)  # DiskMap file → reason
    manifest: str | None = None  # why the manifest cannot be trusted

    def __bool__(self) -> bool:
        return bool(self.chunks or self.diskmaps or self.manifest)


def damaged_path(layout: Layout, snapshot_id: str) -> Path:
    return layout.snapshot_dir(snapshot_id) / DAMAGED_NAME


def read_damage(layout: Layout, snapshot_id: str) -> dict[str, object] | None:
    """The snapshot's damage mark as written, or None when it has none."""
    try:
        doc: dict[str, object] = json.loads(damaged_path(layout, snapshot_id).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:  # a torn mark cannot happen (atomic), a hand-edited one can
        return {"snapshot": snapshot_id, "chunks": [], "manifest": f"unreadable mark: {e}"}
    return doc


def write_damage(
    layout: Layout, snapshot_id: str, damage: Damage, reasons: Callable[[bytes], str]
) -> None:
    """Publish (atomically) the damage mark of a snapshot."""
    doc = {
        "snapshot": snapshot_id,
        "vm": {"id": damage.vm_id, "name": damage.vm_name},
        "marked": datetime.now(UTC).isoformat(timespec="seconds"),
        "chunks": [{"id": c.hex(), "reason": reasons(c)} for c in sorted(damage.chunks)],
        "diskmaps": [{"file": f, "reason": r} for f, r in sorted(damage.diskmaps.items())],
        "manifest": damage.manifest,
    }
    atomic_write(
        damaged_path(layout, snapshot_id), json.dumps(doc, indent=1).encode(), "store.damaged"
    )


def remove_damage(layout: Layout, snapshot_id: str) -> bool:
    path = damaged_path(layout, snapshot_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def still_bad(index: Index, chunk_ids: Iterable[bytes]) -> set[bytes]:
    """The ids that are in the bad list or not indexed."""
    bad = {b.chunk_id for b in index.bad_chunks()}
    return {c for c in chunk_ids if c in bad or index.lookup(c) is None}


def _listed_chunks(doc: Mapping[str, object]) -> list[bytes]:
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        return []
    return [bytes.fromhex(c["id"]) for c in chunks if isinstance(c, dict) and "id" in c]


def damage_of(layout: Layout, index: Index, snapshot_id: str) -> dict[str, object] | None:
    """The snapshot's damage as it stands now: its mark with healed chunks left out, or None
    when it has no mark or every listed problem is healed."""
    doc = read_damage(layout, snapshot_id)
    if doc is None:
        return None
    bad = still_bad(index, _listed_chunks(doc))
    chunks = doc.get("chunks")
    doc["chunks"] = [
        c
        for c in (chunks if isinstance(chunks, list) else [])
        if isinstance(c, dict) and bytes.fromhex(c["id"]) in bad
    ]
    return doc if doc["chunks"] or doc.get("diskmaps") or doc.get("manifest") else None


def clear_healed(layout: Layout, index: Index) -> list[str]:
    """Rewrite every damage mark without the chunks that are healed now; a mark left with
    nothing is removed. Returns the snapshots that are no longer damaged. A snapshot moved
    away meanwhile (prune) is skipped."""
    cleared = []
    for path in sorted(layout.snapshots.glob(f"*/{DAMAGED_NAME}")):
        sid = path.parent.name
        try:
            before = read_damage(layout, sid)
            if before is None:
                continue
            after = damage_of(layout, index, sid)
            if after is None:
                path.unlink()
                fsync_dir(path.parent)
                cleared.append(sid)
            elif after["chunks"] != before.get("chunks"):
                data = json.dumps(after, indent=1).encode()
                atomic_write(path, data, "store.damaged")
        except OSError:
            continue
    return cleared
