"""Check a store: structure (every snapshot's manifest authenticates, its DiskMaps are intact
and every chunk they name is indexed in a pack that is on disk whole) and optionally data
(every indexed record reads back, CRC and AEAD check, and re-hashes to its id). All findings
are collected, never just the first, each naming the object and the snapshots and VMs it
affects. Memory is bounded: DiskMaps and the index are streamed; only the ids of damaged
chunks (and the snapshots they affect) are kept.

Damage marks. A snapshot found damaged carries ``snapshots/<id>/damaged`` (JSON, written
atomically by ``engine.maint.verify``): the bad or missing chunk ids with the reasons, the
DiskMaps that failed, or the manifest's failure. The chunk ids are also in the index's
``bad_chunks`` list, so the next backup that produces a chunk's data stores it again; the
store then *heals* the chunk (``Index.add_pack``) and ``clear_healed`` drops it from the
marks — a snapshot whose marks are all healed is no longer damaged. A mark is only ever a
claim to re-check: ``damage_of`` reports the listed chunks that are still bad or missing.

This is the core that ``tessera store verify`` runs (``check_store`` has no side effects);
sampling, resumption and marks belong to ``engine.maint.verify``.
"""

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import CorruptPack, EngineError, SnapshotNotFound
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.store import format as fmt
from engine.store.locks import reading_snapshot
from engine.store.pack import pack_path, read_trailer
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store
    from engine.store.index import Index
    from engine.store.layout import Layout

DAMAGED_NAME: Final = "damaged"


@dataclass(frozen=True)
class Finding:
    kind: str  # manifest | diskmap | missing-chunk | bad-chunk | pack | trailer | database
    subject: str  # the snapshot, file, chunk or pack concerned
    message: str
    snapshots: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()  # names of the VMs of ``snapshots``


@dataclass
class CheckResult:
    snapshots: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class Damage:
    """What is wrong with one snapshot."""

    vm_id: str = ""
    vm_name: str = ""
    chunks: set[bytes] = field(default_factory=set)  # bad or missing chunk ids
    diskmaps: dict[str, str] = field(default_factory=dict)  # DiskMap file → reason
    manifest: str | None = None  # why the manifest cannot be trusted

    def __bool__(self) -> bool:
        return bool(self.chunks or self.diskmaps or self.manifest)


def pack_problems(store: "Store") -> dict[str, str]:
    """Indexed packs whose file is missing or not the indexed size, with the reason."""
    on_disk = store.layout.pack_files()
    bad: dict[str, str] = {}
    for row in store.index.packs():
        path = on_disk.get(row.name)
        try:
            size = path.stat().st_size if path else None
        except FileNotFoundError:  # GC retired it since the listing
            size = None
        if size != row.size:
            state = "is missing" if size is None else f"has {size} bytes, expected {row.size}"
            bad[row.name] = f"pack {row.name} {state}"
    if bad:  # GC may have retired a pack meanwhile: that is no damage
        indexed = {row.name for row in store.index.packs()}
        bad = {name: reason for name, reason in bad.items() if name in indexed}
    return bad


def trailer_problems(store: "Store", skip: Mapping[str, str]) -> dict[str, str]:
    """Indexed packs (not in ``skip``: missing or short) whose trailer cannot be read or
    does not list as many records as the index says, with the reason. Their records are
    indexed and read fine — the index was rebuilt by scanning them — but the trailer, what
    a rebuild reads first, is wrong until ``repair`` re-seals the pack. Cheap: one footer
    and trailer read per pack."""
    bad: dict[str, str] = {}
    for row in store.index.packs():
        if row.name in skip:
            continue
        path = pack_path(store.layout.packs, row.name)
        try:
            _, entries = read_trailer(path, row.name)
        except CorruptPack as e:
            if path.exists():  # else GC retired it since the listing
                bad[row.name] = f"pack {row.name}: damaged trailer ({e.fields['reason']})"
            continue
        if len(entries) != row.records:
            bad[row.name] = (
                f"pack {row.name}: trailer lists {len(entries)} records, the index {row.records}"
            )
    return bad


def trailer_mismatch(path: Path, name: str, rows: Mapping[int, tuple[bytes, int]]) -> str | None:
    """Why the trailer of the pack at ``path`` does not describe its records, or None.
    ``rows``: offset → (chunk id, length) of every index row located in the pack, checked by
    reading their records; a trailer entry no row covers (a duplicate) has its record header
    read to compare the id and length."""
    try:
        _, entries = read_trailer(path, name)
        with path.open("rb") as f:
            for e in entries:
                row = rows.get(e.offset)
                if row is None:
                    raw = _pread(f.fileno(), fmt.RECORD_HEADER.size, e.offset)
                    magic, *_, payload_len, cid = fmt.RECORD_HEADER.unpack(raw)
                    size = fmt.RECORD_HEADER.size + payload_len + fmt.RECORD_CRC.size
                    row = (cid, size) if magic == fmt.RECORD_MAGIC else (b"", -1)
                if row != (e.chunk_id, e.length):
                    return f"trailer entry at offset {e.offset} does not match the record there"
    except CorruptPack as e:
        return str(e.fields["reason"])
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    listed = {e.offset for e in entries}
    if not rows.keys() <= listed:
        return f"trailer omits the record at offset {min(rows.keys() - listed)}"
    return None


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ValueError(f"short read at offset {offset}")
    return data


def check_store(store: "Store", data: bool = False) -> CheckResult:
    result = CheckResult()
    bad_chunks: dict[bytes, str] = {}
    bad_packs = pack_problems(store)
    for name, reason in bad_packs.items():
        result.findings.append(Finding("pack", name, reason))
    for name, reason in trailer_problems(store, bad_packs).items():
        result.findings.append(Finding("trailer", name, reason))
    if data:
        for chunk_id, location in store.index.iter_chunks():
            try:
                store.read_chunk(chunk_id)
            except EngineError as e:
                bad_chunks[chunk_id] = str(e)
            result.chunks_checked += 1
            result.bytes_checked += location.length
    check_structure(store, result, bad_chunks, bad_packs)
    return result


def check_structure(
    store: "Store",
    result: CheckResult,
    bad_chunks: Mapping[bytes, str],
    bad_packs: Mapping[str, str],
    report_unreferenced: bool = True,
) -> dict[str, Damage]:
    """Walk every snapshot (share-locked, so prune leaves it alone meanwhile); add findings
    to ``result`` for bad manifests and DiskMaps and for referenced chunks that are in
    ``bad_chunks``, not indexed, or indexed in one of ``bad_packs``; then one finding per
    unreferenced bad chunk. Returns the damage of each damaged snapshot."""
    damage: dict[str, Damage] = {}
    affected: dict[bytes, set[str]] = {}
    vm_of: dict[str, str] = {}
    for entry in store.snapshots():
        sid = entry.snapshot_id
        vm_of[sid] = entry.vm_name
        snap = Damage(entry.vm_id, entry.vm_name)
        try:
            with reading_snapshot(store.layout, sid):
                result.snapshots += 1
                _check_snapshot(store, result, sid, snap, bad_chunks, bad_packs)
        except SnapshotNotFound:  # pruned since the listing: nothing to check
            continue
        for cid in snap.chunks:
            affected.setdefault(cid, set()).add(sid)
        if snap:
            damage[sid] = snap
    for cid, sids in sorted(affected.items()):
        reason = bad_chunks.get(cid, f"chunk {short(cid)} is not in the store")
        kind = "bad-chunk" if cid in bad_chunks else "missing-chunk"
        where = store.index.lookup(cid)
        if where is None:
            kind = "missing-chunk"
        elif where.pack in bad_packs:
            reason = f"chunk {short(cid)}: {bad_packs[where.pack]}"
        snaps = tuple(sorted(sids))
        vms = tuple(sorted({vm_of[s] for s in snaps}))
        result.findings.append(Finding(kind, short(cid), reason, snaps, vms))
    if report_unreferenced:
        for cid, reason in bad_chunks.items():
            if cid not in affected:
                result.findings.append(Finding("bad-chunk", short(cid), reason))
    return damage


def _check_snapshot(
    store: "Store",
    result: CheckResult,
    sid: str,
    snap: Damage,
    bad_chunks: Mapping[bytes, str],
    bad_packs: Mapping[str, str],
) -> None:
    vms = (snap.vm_name,)
    try:
        manifest = store.manifest(sid)
    except EngineError as e:
        result.findings.append(Finding("manifest", sid, str(e), (sid,), vms))
        snap.manifest = str(e)
        return
    ids: list[bytes] = [bytes.fromhex(manifest.config.chunk_id)] if manifest.config else []
    for disk in manifest.disks:
        try:
            with store.open_diskmap(manifest, disk) as dm:
                for block in dm.iter_blocks():
                    ids.extend(
                        block[i : i + CHUNK_ID_SIZE]
                        for i in range(0, len(block), CHUNK_ID_SIZE)
                        if block[i : i + CHUNK_ID_SIZE] != ZERO_ID
                    )
                    _check_ids(store, ids, bad_chunks, bad_packs, snap.chunks)
                    ids = []
        except (EngineError, OSError) as e:
            message = f"disk {disk.disk_id}: {e}"
            result.findings.append(
                Finding("diskmap", f"{sid}/{disk.diskmap}", message, (sid,), vms)
            )
            snap.diskmaps[disk.diskmap] = message
    _check_ids(store, ids, bad_chunks, bad_packs, snap.chunks)


def _check_ids(
    store: "Store",
    ids: list[bytes],
    bad_chunks: Mapping[bytes, str],
    bad_packs: Mapping[str, str],
    damaged: set[bytes],
) -> None:
    """Add to ``damaged`` every id that is bad, unindexed or in a bad pack."""
    ask = []
    for chunk_id in ids:
        if chunk_id in bad_chunks or chunk_id in damaged:
            damaged.add(chunk_id)
        else:
            ask.append(chunk_id)
    packs = store.index.packs_of(sorted(ask))  # in id order: B-tree pages visited in order
    for chunk_id in ask:
        pack = packs.get(chunk_id)
        if pack is None or pack in bad_packs:
            damaged.add(chunk_id)


# --- damage marks ----------------------------------------------------------------------------


def damaged_path(layout: "Layout", snapshot_id: str) -> Path:
    return layout.snapshot_dir(snapshot_id) / DAMAGED_NAME


def read_damage(layout: "Layout", snapshot_id: str) -> dict[str, object] | None:
    """The snapshot's damage mark as written, or None when it has none."""
    try:
        doc: dict[str, object] = json.loads(damaged_path(layout, snapshot_id).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:  # a torn mark cannot happen (atomic), a hand-edited one can
        return {"snapshot": snapshot_id, "chunks": [], "manifest": f"unreadable mark: {e}"}
    return doc


def write_damage(
    layout: "Layout", snapshot_id: str, damage: Damage, reasons: Callable[[bytes], str]
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


def remove_damage(layout: "Layout", snapshot_id: str) -> bool:
    path = damaged_path(layout, snapshot_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def still_bad(index: "Index", chunk_ids: Iterable[bytes]) -> set[bytes]:
    """The ids that are in the bad list or not indexed."""
    bad = {b.chunk_id for b in index.bad_chunks()}
    return {c for c in chunk_ids if c in bad or index.lookup(c) is None}


def _listed_chunks(doc: Mapping[str, object]) -> list[bytes]:
    chunks = doc.get("chunks")
    if not isinstance(chunks, list):
        return []
    return [bytes.fromhex(c["id"]) for c in chunks if isinstance(c, dict) and "id" in c]


def damage_of(layout: "Layout", index: "Index", snapshot_id: str) -> dict[str, object] | None:
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


def clear_healed(layout: "Layout", index: "Index") -> list[str]:
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
