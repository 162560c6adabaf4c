"""The catalog: snapshots queryable by VM and time (SQLite, ``catalog.db``).

Manifests are the truth; the catalog is a cache of what they say, so listing thousands of
snapshots never reads thousands of files. It is updated right after a manifest is committed
and reconciled with the manifests on disk when the store is opened for writing (a crash
between the two is repaired then), so it never lists a snapshot that does not exist. A
missing or damaged ``catalog.db`` is rebuilt from the manifests by a writable open
(``dbfiles``).
"""

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.store.dbfiles import connect_ro
from engine.store.manifest import Manifest
from engine.util import failpoints

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots(
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    vm_name TEXT NOT NULL,
    time TEXT NOT NULL,
    level TEXT NOT NULL,
    parent TEXT,
    disks INTEGER NOT NULL,
    size INTEGER NOT NULL,
    data_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_vm_time ON snapshots(vm_id, time);
"""

_COLUMNS = "id, vm_id, vm_name, time, level, parent, disks, size, data_bytes"


@dataclass(frozen=True)
class CatalogEntry:
    snapshot_id: str
    vm_id: str
    vm_name: str
    time: str
    level: str
    parent: str | None
    disks: int
    size: int
    data_bytes: int


class Catalog:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self._lock = threading.Lock()
        self.note: str | None = None  # how a read-only open had to degrade (a full disk)
        if readonly:
            if not path.exists():
                raise FileNotFoundError(path)
            self._conn, self.note = connect_ro(path)
            self._conn.isolation_level = None
        else:
            self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def add(self, m: Manifest) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                f"INSERT OR REPLACE INTO snapshots({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    m.snapshot_id,
                    m.vm_id,
                    m.vm_name,
                    m.time,
                    m.level,
                    m.parent,
                    len(m.disks),
                    m.size,
                    m.data_bytes,
                ),
            )
            failpoints.hit("store.catalog.before_commit")
            self._conn.execute("COMMIT")

    def remove(self, snapshot_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def entries(self, vm: str | None = None) -> list[CatalogEntry]:
        """Snapshots ordered by VM name and time; ``vm`` matches a VM id or name."""
        with self._lock:
            if vm is None:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM snapshots ORDER BY vm_name, time, id"
                ).fetchall()
            else:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM snapshots WHERE vm_id = ? OR vm_name = ? "
                    "ORDER BY time, id",
                    (vm, vm),
                ).fetchall()
        return [CatalogEntry(*r) for r in rows]

    def get(self, snapshot_id: str) -> CatalogEntry | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)
            ).fetchone()
        return CatalogEntry(*row) if row else None

    def match(self, prefix: str) -> list[str]:
        """Snapshot ids starting with ``prefix`` (for short ids on the command line)."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM snapshots WHERE id LIKE ? ESCAPE '\\' ORDER BY id",
                (escaped + "%",),
            ).fetchall()
        return [r[0] for r in rows]

    def reconcile(self, on_disk: set[str], load: Callable[[str], Manifest]) -> tuple[int, int]:
        """Make the catalog list exactly the snapshots in ``on_disk``; (added, removed)."""
        with self._lock:
            known = {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}
        removed = known - on_disk
        for sid in removed:
            self.remove(sid)
        added = on_disk - known
        for sid in sorted(added):
            self.add(load(sid))
        return len(added), len(removed)
