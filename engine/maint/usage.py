"""Space accounting: what each snapshot and VM occupies, shares, and would free.

For every snapshot, every VM and the store as a whole (``store_usage``):

- ``logical_bytes``     virtual disk sizes (what a restore writes);
- ``data_bytes``        bytes in non-zero slots, counted per slot (before dedup);
- ``chunks``, ``referenced_bytes``  the distinct chunks referenced, and their plaintext;
- ``stored_bytes``      record bytes of those chunks (after compression and encryption);
- ``unique_*``          chunks referenced by nothing else in the store (for a VM: by no
                        other VM), ``shared_bytes`` the rest of ``referenced_bytes``;
- ``frees_bytes``       record bytes of the unique chunks: what removing the snapshot (or
                        all of the VM's snapshots) lets GC reclaim. Pack headers and
                        trailers are not counted; repacking frees them with the records.

The store also reports its index totals and the chunks no snapshot references (garbage for
the next GC, including what removed snapshots in their grace period alone reference).

Memory is bounded independently of store size. Python holds one DiskMap block (32 Ki ids)
and one small object per snapshot and VM; per-chunk state lives in a temporary SQLite
database (``chunks``: id, how many snapshots and VMs reference it, the first snapshot, the
last VM — about 80 bytes on disk per distinct chunk, 80 MB per TiB of unique data at 1 MiB
chunks) whose page cache is capped at ``_CACHE_KIB``. A Python dict of counts keyed by
32-byte ids would cost ~100 bytes of RAM per chunk instead. The index is attached read-only
and joined in SQL. Snapshots are visited grouped by VM, so "how many VMs reference this
chunk" is counted as VM changes without a per-chunk set.
"""

import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID
from engine.maint.prune import is_protected, removed_snapshots
from engine.store.catalog import CatalogEntry

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

_CACHE_KIB: Final = 32 * 1024  # SQLite page cache of the work database: 32 MiB

_SCHEMA = """
CREATE TABLE chunks(
    id BLOB PRIMARY KEY, nsnaps INTEGER, first_snap INTEGER, nvms INTEGER, last_vm INTEGER
) WITHOUT ROWID;
CREATE TABLE cur(id BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE vmcur(id BLOB PRIMARY KEY) WITHOUT ROWID;
"""

# count, plaintext and record bytes of a set of chunk ids, and how many are not indexed
_SIZES = (
    "SELECT count(*), coalesce(sum(i.plain), 0), coalesce(sum(i.length), 0), "
    "count(*) - count(i.id) FROM {table} c LEFT JOIN idx.chunks i ON i.id = c.id"
)


@dataclass
class Usage:
    snapshots: int = 0
    logical_bytes: int = 0
    data_bytes: int = 0
    chunks: int = 0
    referenced_bytes: int = 0
    stored_bytes: int = 0
    unique_chunks: int = 0
    unique_bytes: int = 0
    frees_bytes: int = 0
    missing_chunks: int = 0  # referenced but not in the index (``store verify`` explains)

    @property
    def shared_bytes(self) -> int:
        return self.referenced_bytes - self.unique_bytes

    def doc(self) -> dict[str, int]:
        return {
            "snapshots": self.snapshots,
            "logical_bytes": self.logical_bytes,
            "data_bytes": self.data_bytes,
            "chunks": self.chunks,
            "referenced_bytes": self.referenced_bytes,
            "stored_bytes": self.stored_bytes,
            "unique_chunks": self.unique_chunks,
            "unique_bytes": self.unique_bytes,
            "shared_bytes": self.shared_bytes,
            "frees_bytes": self.frees_bytes,
            "missing_chunks": self.missing_chunks,
        }


@dataclass
class SnapshotUsage:
    snapshot_id: str
    vm_id: str
    vm_name: str
    time: str
    level: str
    protected: bool
    usage: Usage


@dataclass
class VmUsage:
    vm_id: str
    vm_name: str
    usage: Usage
    snapshots: list[SnapshotUsage] = field(default_factory=list)


@dataclass
class StoreUsage:
    path: str
    total: Usage  # over all snapshots (unique = referenced: nothing else shares them)
    index_chunks: int
    index_plain_bytes: int
    index_stored_bytes: int
    pack_bytes: int
    unreferenced_chunks: int  # indexed, referenced by no snapshot: the next GC's garbage
    unreferenced_bytes: int  # their record bytes
    removed_snapshots: int  # in removed/, waiting for the GC grace period
    vms: list[VmUsage]

    def doc(self) -> dict[str, object]:
        return {
            "path": self.path,
            "total": self.total.doc(),
            "index": {
                "chunks": self.index_chunks,
                "plain_bytes": self.index_plain_bytes,
                "stored_bytes": self.index_stored_bytes,
                "pack_bytes": self.pack_bytes,
            },
            "unreferenced": {"chunks": self.unreferenced_chunks, "bytes": self.unreferenced_bytes},
            "removed_snapshots": self.removed_snapshots,
            "vms": [
                {
                    "id": v.vm_id,
                    "name": v.vm_name,
                    **v.usage.doc(),
                    "snapshot_usage": [
                        {
                            "id": s.snapshot_id,
                            "time": s.time,
                            "level": s.level,
                            "protected": s.protected,
                            **s.usage.doc(),
                        }
                        for s in v.snapshots
                    ],
                }
                for v in self.vms
            ],
        }


def store_usage(store: "Store", workdir: Path | None = None) -> StoreUsage:
    """Account the space of every committed snapshot (streams DiskMaps; see the module doc).

    ``workdir`` holds the temporary work database (default: the system temp directory).
    Raises what reading a manifest or DiskMap raises (naming the snapshot or file).
    """
    entries = sorted(store.snapshots(), key=lambda e: (e.vm_id, e.time, e.snapshot_id))
    with tempfile.TemporaryDirectory(prefix="tessera-usage-", dir=workdir) as tmp:
        db = sqlite3.connect(f"file:{Path(tmp) / 'work.db'}", uri=True, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.executescript(_SCHEMA)
            db.execute("ATTACH DATABASE ? AS idx", (f"file:{store.layout.index}?mode=ro",))
            return _account(store, db, entries)
        finally:
            db.close()


def _account(store: "Store", db: sqlite3.Connection, entries: list[CatalogEntry]) -> StoreUsage:
    vms: list[VmUsage] = []
    snaps: list[SnapshotUsage] = []
    total = Usage()
    vm_index: dict[str, int] = {}
    db.execute("BEGIN")
    for n, e in enumerate(entries):
        if e.vm_id not in vm_index:
            if vms:
                _close_vm(db, vms[-1])
            vm_index[e.vm_id] = len(vms)
            vms.append(VmUsage(e.vm_id, e.vm_name, Usage()))
        vm = vms[-1]
        manifest = store.manifest(e.snapshot_id)
        db.execute("DELETE FROM cur")
        if manifest.config is not None:
            db.execute(
                "INSERT OR IGNORE INTO cur VALUES (?)", (bytes.fromhex(manifest.config.chunk_id),)
            )
        for disk in manifest.disks:
            with store.open_diskmap(manifest, disk) as dm:
                for block in dm.iter_blocks():
                    db.executemany(
                        "INSERT OR IGNORE INTO cur VALUES (?)",
                        (
                            (block[i : i + CHUNK_ID_SIZE],)
                            for i in range(0, len(block), CHUNK_ID_SIZE)
                            if block[i : i + CHUNK_ID_SIZE] != ZERO_ID
                        ),
                    )
        count, plain, stored, missing = db.execute(_SIZES.format(table="cur")).fetchone()
        usage = Usage(
            snapshots=1,
            logical_bytes=manifest.size,
            data_bytes=manifest.data_bytes,
            chunks=count,
            referenced_bytes=plain,
            stored_bytes=stored,
            missing_chunks=missing,
        )
        db.execute(
            "INSERT INTO chunks(id, nsnaps, first_snap, nvms, last_vm) "
            "SELECT id, 1, ?, 1, ? FROM cur WHERE true "
            "ON CONFLICT(id) DO UPDATE SET nsnaps = nsnaps + 1, "
            "nvms = nvms + (last_vm != excluded.last_vm), last_vm = excluded.last_vm",
            (n, vm_index[e.vm_id]),
        )
        db.execute("INSERT OR IGNORE INTO vmcur SELECT id FROM cur")
        s = SnapshotUsage(
            e.snapshot_id,
            e.vm_id,
            e.vm_name,
            e.time,
            e.level,
            is_protected(store.layout, e.snapshot_id),
            usage,
        )
        snaps.append(s)
        vm.snapshots.append(s)
        for u in (vm.usage, total):
            u.snapshots += 1
            u.logical_bytes += usage.logical_bytes
            u.data_bytes += usage.data_bytes
    if vms:
        _close_vm(db, vms[-1])

    unique = (
        "SELECT c.{key}, count(*), coalesce(sum(i.plain), 0), coalesce(sum(i.length), 0) "
        "FROM chunks c LEFT JOIN idx.chunks i ON i.id = c.id WHERE c.{count} = 1 "
        "GROUP BY c.{key}"
    )
    for key, count, owners in (
        ("first_snap", "nsnaps", [s.usage for s in snaps]),
        ("last_vm", "nvms", [v.usage for v in vms]),
    ):
        for owner, chunks, plain, stored in db.execute(unique.format(key=key, count=count)):
            owners[owner].unique_chunks = chunks
            owners[owner].unique_bytes = plain
            owners[owner].frees_bytes = stored

    count, plain, stored, missing = db.execute(_SIZES.format(table="chunks")).fetchone()
    total.chunks, total.referenced_bytes, total.stored_bytes = count, plain, stored
    total.missing_chunks = missing
    total.unique_chunks, total.unique_bytes, total.frees_bytes = count, plain, stored
    garbage, garbage_bytes = db.execute(
        "SELECT count(*), coalesce(sum(i.length), 0) FROM idx.chunks i "
        "WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = i.id)"
    ).fetchone()
    db.execute("COMMIT")
    stats = store.index.stats()
    return StoreUsage(
        path=str(store.path),
        total=total,
        index_chunks=stats.chunks,
        index_plain_bytes=stats.plain_bytes,
        index_stored_bytes=stats.stored_bytes,
        pack_bytes=stats.pack_bytes,
        unreferenced_chunks=garbage,
        unreferenced_bytes=garbage_bytes,
        removed_snapshots=len(removed_snapshots(store.layout)),
        vms=sorted(vms, key=lambda v: (v.vm_name, v.vm_id)),
    )


def _close_vm(db: sqlite3.Connection, vm: VmUsage) -> None:
    """Fill a VM's distinct-chunk totals from ``vmcur``, then empty it for the next VM."""
    count, plain, stored, missing = db.execute(_SIZES.format(table="vmcur")).fetchone()
    vm.usage.chunks, vm.usage.referenced_bytes, vm.usage.stored_bytes = count, plain, stored
    vm.usage.missing_chunks = missing
    db.execute("DELETE FROM vmcur")
