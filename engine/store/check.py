"""Check a store: structure (every snapshot's DiskMaps are intact and every chunk they name
is indexed) and optionally data (every indexed record reads back, CRC and AEAD check, and
re-hashes to its id). All findings are collected, never just the first, each naming the
object and the snapshots it affects. Memory is bounded: DiskMaps and the index are streamed;
only the ids of damaged chunks are kept.

This is the core that ``tessera store verify`` runs; scheduling, sampling and resumption
belong to maintenance jobs.
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.core.errors import EngineError
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short

if TYPE_CHECKING:
    from engine.store.chunk_store import Store


@dataclass(frozen=True)
class Finding:
    kind: str  # manifest | diskmap | missing-chunk | bad-chunk | pack
    subject: str  # the snapshot, file, chunk or pack concerned
    message: str
    snapshots: tuple[str, ...] = ()


@dataclass
class CheckResult:
    snapshots: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def check_store(store: "Store", data: bool = False) -> CheckResult:
    result = CheckResult()
    bad_chunks: dict[bytes, str] = {}
    on_disk = store.layout.pack_files()
    bad_packs: dict[str, str] = {}
    for row in store.index.packs():
        path = on_disk.get(row.name)
        size = path.stat().st_size if path else None
        if size != row.size:
            state = "is missing" if size is None else f"has {size} bytes, expected {row.size}"
            bad_packs[row.name] = f"pack {row.name} {state}"
            result.findings.append(Finding("pack", row.name, bad_packs[row.name]))
    if data:
        for chunk_id, location in store.index.iter_chunks():
            try:
                store.read_chunk(chunk_id)
            except EngineError as e:
                bad_chunks[chunk_id] = str(e)
            result.chunks_checked += 1
            result.bytes_checked += location.length
    affected: dict[bytes, set[str]] = {}
    for entry in store.snapshots():
        result.snapshots += 1
        sid = entry.snapshot_id
        try:
            manifest = store.manifest(sid)
        except EngineError as e:
            result.findings.append(Finding("manifest", sid, str(e), (sid,)))
            continue
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
                        ids = _check_ids(store, ids, bad_chunks, bad_packs, affected, sid)
            except (EngineError, OSError) as e:
                result.findings.append(
                    Finding("diskmap", f"{sid}/{disk.diskmap}", f"disk {disk.disk_id}: {e}", (sid,))
                )
        _check_ids(store, ids, bad_chunks, bad_packs, affected, sid)
    for cid, sids in sorted(affected.items()):
        reason = bad_chunks.get(cid, f"chunk {short(cid)} is not in the store")
        kind = "bad-chunk" if cid in bad_chunks else "missing-chunk"
        if (where := store.index.lookup(cid)) is not None and where.pack in bad_packs:
            reason = f"chunk {short(cid)}: {bad_packs[where.pack]}"
        result.findings.append(Finding(kind, short(cid), reason, tuple(sorted(sids))))
    for cid, reason in bad_chunks.items():
        if cid not in affected:
            result.findings.append(Finding("bad-chunk", short(cid), reason))
    return result


def _check_ids(
    store: "Store",
    ids: list[bytes],
    bad_chunks: dict[bytes, str],
    bad_packs: dict[str, str],
    affected: dict[bytes, set[str]],
    snapshot: str,
) -> list[bytes]:
    """Record ``snapshot`` against every id that is damaged, unindexed or in a bad pack."""
    for chunk_id in ids:
        if chunk_id in bad_chunks:
            affected.setdefault(chunk_id, set()).add(snapshot)
            continue
        loc = store.index.lookup(chunk_id)
        if loc is None or loc.pack in bad_packs:
            affected.setdefault(chunk_id, set()).add(snapshot)
    return []
