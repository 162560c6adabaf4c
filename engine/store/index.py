"""The chunk index: ChunkId → (pack, offset, length), on disk in SQLite (WAL mode).

It is a cache: everything in it can be rebuilt from pack trailers (``rebuild-index``). RAM
stays flat however large the store grows: Python never holds per-chunk objects for the
whole store, only SQLite's page cache.

Tables::

    packs(id, name, size, records)                 one row per sealed pack
    chunks(id BLOB 32, pack, offset, length, plain) one row per record, WITHOUT ROWID

A sealed pack's entries are added in one transaction with ``synchronous=FULL``, so after
``add_pack`` returns the entries are durable. A chunk id seen in two packs keeps its first
location (the duplicate record is dead weight that GC repacks away).

Connections are per thread (SQLite connections must not be shared); writes are serialised
by a lock.
"""

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.core.ids import ChunkId
from engine.store.pack import SealedPack
from engine.util import failpoints

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    plain INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
"""


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    length: int
    plain_len: int


@dataclass(frozen=True)
class PackRow:
    name: str
    size: int
    records: int


@dataclass(frozen=True)
class IndexStats:
    packs: int
    chunks: int
    plain_bytes: int
    stored_bytes: int
    pack_bytes: int


class Index:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self._readonly = readonly
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not readonly:
            conn = self._conn()
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._readonly:
                uri = f"file:{self.path}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def lookup(self, chunk_id: bytes) -> Location | None:
        row = (
            self._conn()
            .execute(
                "SELECT p.name, c.offset, c.length, c.plain FROM chunks c "
                "JOIN packs p ON p.id = c.pack WHERE c.id = ?",
                (chunk_id,),
            )
            .fetchone()
        )
        return Location(*row) if row else None

    def has(self, chunk_id: bytes) -> bool:
        return (
            self._conn().execute("SELECT 1 FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            is not None
        )

    def add_pack(self, sealed: SealedPack) -> None:
        """Add a sealed pack and its entries durably, in one transaction."""
        conn = self._conn()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "INSERT INTO packs(name, size, records) VALUES (?, ?, ?)",
                    (sealed.name, sealed.size, len(sealed.entries)),
                )
                pack_id = cur.lastrowid
                conn.executemany(
                    "INSERT OR IGNORE INTO chunks(id, pack, offset, length, plain) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        (e.chunk_id, pack_id, e.offset, e.length, e.plain_len)
                        for e in sealed.entries
                    ),
                )
                failpoints.hit("store.index.before_commit")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        failpoints.hit("store.index.after_commit")

    def drop_pack(self, name: str) -> int:
        """Forget a pack and every chunk located in it; returns how many chunks."""
        conn = self._conn()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT id FROM packs WHERE name = ?", (name,)).fetchone()
                if row is None:
                    conn.execute("ROLLBACK")
                    return 0
                n = conn.execute("DELETE FROM chunks WHERE pack = ?", (row[0],)).rowcount
                conn.execute("DELETE FROM packs WHERE id = ?", (row[0],))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n

    def packs(self) -> list[PackRow]:
        rows = self._conn().execute("SELECT name, size, records FROM packs ORDER BY id")
        return [PackRow(*r) for r in rows]

    def iter_chunks(self, batch: int = 10_000) -> Iterator[tuple[ChunkId, Location]]:
        """Every indexed chunk, in id order, fetched in batches (bounded memory)."""
        last = b""
        while True:
            rows = (
                self._conn()
                .execute(
                    "SELECT c.id, p.name, c.offset, c.length, c.plain FROM chunks c "
                    "JOIN packs p ON p.id = c.pack WHERE c.id > ? ORDER BY c.id LIMIT ?",
                    (last, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            for cid, *loc in rows:
                yield ChunkId(cid), Location(*loc)
            last = rows[-1][0]

    def stats(self) -> IndexStats:
        conn = self._conn()
        packs, pack_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM packs"
        ).fetchone()
        chunks, plain, stored = conn.execute(
            "SELECT count(*), coalesce(sum(plain), 0), coalesce(sum(length), 0) FROM chunks"
        ).fetchone()
        return IndexStats(packs, chunks, plain, stored, pack_bytes)

    def clear(self) -> None:
        conn = self._conn()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM chunks")
            conn.execute("DELETE FROM packs")
            conn.execute("COMMIT")
