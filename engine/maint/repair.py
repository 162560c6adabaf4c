"""Repair a store (``tessera store repair``; needs the writer lock).

1. The index is rebuilt from every pack (``Store.rebuild_index``): from its trailer, or, when
   the trailer is damaged or missing, from a scan of its records (``engine.store.scan``:
   every record whose CRC — and AEAD and id, with the data key — holds is kept).
2. Each pack indexed by scanning is *re-sealed*: its intact records are copied into a new
   sealed pack, so the trailer is right again and verify is clean::

       new pack sealed (fsync, rename, fsync dir)
         → note quarantine/<old>.json (why, replaced_by <new>, what was lost)
         → one index transaction: the rows move to the new pack, the old pack is forgotten
         → the old pack is renamed to quarantine/<old>.pack

   A crash before the index commit leaves the old pack indexed (the next repair re-seals it
   again; the unused copy holds no live rows and GC retires it); after it, open = recover
   sees the unindexed old pack, its note and the replacement on disk, and finishes the move.
3. A pack without a single intact record is moved to ``quarantine/`` with a note.
4. The structure is verified, which marks and lists the snapshots and VMs that lost data:
   exit 3 when anything is lost. A re-sealed pack that kept every record loses nothing.

The SQLite files are dealt with by the writable open before this runs (``dbfiles``): a
missing or damaged index or catalog is rebuilt (a damaged one moved aside first) and
reported in ``recovery``.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.ids import short
from engine.maint.verify import Progress, VerifyOptions, VerifyResult, verify
from engine.store.codec import check_crc
from engine.store.dbfiles import os_errors, sqlite_errors
from engine.store.pack import PACK_SUFFIX, PackWriter, SealedPack, pack_path
from engine.store.scan import PackScan
from engine.util import failpoints
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store


@dataclass
class Quarantined:
    pack: str
    reason: str
    path: str


@dataclass
class Resealed:
    pack: str  # the pack whose trailer was damaged (now in quarantine/)
    new_pack: str  # the sealed pack holding its intact records
    kept: int  # records copied
    lost: list[str]  # damaged ranges given up ("N bytes at offset O (chunk c): why")
    lost_chunks: list[str]  # short ids of the chunks those ranges held, where known
    reason: str  # what was wrong with the trailer


@dataclass
class RepairResult:
    recovery: list[str] = field(default_factory=list)  # what rebuilding the index did
    quarantined: list[Quarantined] = field(default_factory=list)
    resealed: list[Resealed] = field(default_factory=list)
    verify: VerifyResult = field(default_factory=VerifyResult)
    indexed_packs: int = 0
    indexed_chunks: int = 0

    @property
    def lost(self) -> bool:
        return bool(self.quarantined) or any(r.lost for r in self.resealed) or not self.verify.ok

    def doc(self) -> dict[str, object]:
        return {
            "recovery": self.recovery,
            "quarantined": [asdict(q) for q in self.quarantined],
            "resealed": [asdict(r) for r in self.resealed],
            "indexed_packs": self.indexed_packs,
            "indexed_chunks": self.indexed_chunks,
            "verify": self.verify.doc(),
            "damaged": self.verify.damaged,
            "vms": self.verify.vms,
            "lost": self.lost,
        }


def repair(store: "Store", progress: Progress | None = None) -> RepairResult:
    """Repair ``store`` as the module docstring says. Needs the store opened for writing.
    Raises StoreError (naming the file and the errno) when a write fails, e.g. a full disk."""
    if not store.writable:
        raise ValueError("repair needs the store opened for writing")
    result = RepairResult()
    files = store.report.files
    report = store.rebuild_index()
    result.recovery = files + [line for line in report.lines() if line not in files]
    with os_errors(store.path), sqlite_errors(store.layout.index):
        for scan in report.scanned:
            result.resealed.append(_reseal(store, scan))
        indexed = {p.name for p in store.index.packs()}
        for line in report.unreadable_packs:
            name, _, reason = line.partition(" ")
            path = pack_path(store.layout.packs, name)
            if name not in indexed and path.exists():
                result.quarantined.append(
                    _quarantine(store, name, path, f"corrupt pack {name}: {reason.strip('()')}")
                )
        stats = store.index.stats()
    result.indexed_packs, result.indexed_chunks = stats.packs, stats.chunks
    result.verify = verify(store, VerifyOptions(progress=progress))
    return result


def _reseal(store: "Store", scan: PackScan) -> Resealed:
    """Copy the intact records of a pack indexed by scanning into a new sealed pack; move
    the rows in one index transaction; quarantine the old pack (order: module docstring)."""
    old = pack_path(store.layout.packs, scan.name)
    writer = PackWriter(store.layout.packs)
    try:
        with old.open("rb") as f:
            for e in scan.entries:
                record = os.pread(f.fileno(), e.length, e.offset)
                check_crc(record, scan.name, e.offset)  # the file is what was scanned
                writer.append(e.chunk_id, record, e.plain_len)
        sealed = writer.seal()
    except BaseException:
        writer.abort()
        raise
    failpoints.hit("repair.reseal.sealed")
    lost = [x.line() for x in scan.lost]
    lost_chunks = [short(x.chunk) for x in scan.lost if x.chunk]
    reason = f"damaged trailer ({scan.trailer})"
    _write_note(store, scan.name, old, reason, replaced_by=sealed.name, kept=len(sealed.entries))
    failpoints.hit("repair.reseal.noted")
    store.publish_pack(sealed)
    store.index.replace_packs(
        SealedPack(sealed.name, sealed.size, sealed.entries), [scan.name], [scan.name]
    )
    failpoints.hit("repair.reseal.committed")
    store.note_indexed(sealed)
    _move(store, old)
    store.delete_packs([scan.name])
    return Resealed(scan.name, sealed.name, len(sealed.entries), lost, lost_chunks, reason)


def _quarantine(store: "Store", name: str, path: Path, reason: str) -> Quarantined:
    """Move a pack to ``STORE/quarantine/`` beside a note (written first, so a moved pack
    always has one; a crash in between leaves the pack in place for the next repair)."""
    _write_note(store, name, path, reason)
    moved = _move(store, path)
    store.delete_packs([name])  # a pack in a bucket: the copy moved is the evidence kept
    return Quarantined(name, reason, str(moved))


def _write_note(store: "Store", name: str, path: Path, reason: str, **more: object) -> None:
    directory = store.layout.quarantine
    if not directory.exists():
        directory.mkdir()
        fsync_dir(store.path)
    note = {
        "pack": name,
        "reason": reason,
        "size": path.stat().st_size,
        "quarantined": datetime.now(UTC).isoformat(timespec="seconds"),
        "from": str(path.relative_to(store.path)),
        **more,
    }
    atomic_write(directory / f"{name}.json", json.dumps(note, indent=1).encode(), "verify.note")


def _move(store: "Store", path: Path) -> Path:
    target = store.layout.quarantine / f"{path.stem}{PACK_SUFFIX}"
    os.rename(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)
    return target
