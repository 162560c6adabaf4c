"""Check a store: structure (every snapshot's manifest authenticates, its DiskMaps are intact
and every chunk they name is indexed in a pack that is on disk whole) and optionally data
(every indexed record reads back, CRC and AEAD check, and re-hashes to its id). All findings
are collected, never just the first, each naming the object and the snapshots and VMs it
affects. Memory is bounded: DiskMaps and the index are streamed; only the ids of damaged
chunks (and the snapshots they affect) are kept.

This is the core that ``tessera store verify`` runs (``check_store`` has no side effects);
sampling, resumption and the damage marks it writes (``engine.store.damage``) belong to
``engine.maint.verify``. It reads through an open ``Store`` — its index, packs and
snapshots — so it sits above the store, which never imports it.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import CorruptPack, EngineError, PackMissing, SnapshotNotFound
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.store import format as fmt
from engine.store.damage import Damage
from engine.store.locks import reading_snapshot
from engine.store.pack import read_trailer

if TYPE_CHECKING:
    from engine.store.chunk_store import Store


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


def pack_problems(store: "Store") -> dict[str, str]:
    """Indexed packs that are missing where packs live (``packs/`` or the bucket) or are
    not the indexed size, with the reason."""
    there = store.pack_sizes()
    bad: dict[str, str] = {}
    for row in store.index.packs():
        size = there.get(row.name)
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
        try:
            _, entries = store.pack_trailer(row.name)
        except (FileNotFoundError, PackMissing):  # GC retired it since the listing
            continue
        except CorruptPack as e:
            if store.index.pack_size(row.name) is not None:  # else GC retired it meanwhile
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
