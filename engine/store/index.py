"""The chunk index: ChunkId → (pack, offset, length), on disk in SQLite (WAL mode).

It is a cache: everything in it can be rebuilt from the packs (``rebuild-index``: trailers,
or a scan of the records where a trailer is damaged; a damaged ``index.db`` is moved aside
first — ``dbfiles``). RAM
stays flat however large the store grows: Python never holds per-chunk objects for the
whole store, only SQLite's page cache.

Tables::

    packs(id, name, size, records)                            one row per sealed pack
    chunks(id BLOB 32, pack, offset, length, plain, condemned) one row per record, WITHOUT ROWID
    bad_chunks(id, pack, offset, reason, since)               verify's findings (below)
    uploads(name, started)                                    packs being put in a bucket
    locks(name, until)                                        object lock dates in a bucket

A sealed pack's entries are added in one transaction with ``synchronous=FULL``, so after
``add_pack`` returns the entries are durable. A chunk id seen in two packs keeps its first
location (the duplicate record is dead weight that GC repacks away) — unless the first is
*condemned*: ``condemned`` is 0 for a live chunk, -1 while GC is condemning it, else the
``LeaseClock`` stamp written right after GC condemned it. A condemned chunk still reads
(``lookup``) but does not deduplicate (``has`` is false), so a writer stores it again and the
new location replaces the row and revives it; GC deletes rows only once condemned (protocol:
``engine.store`` docstring). A chunk in ``bad_chunks`` (verify found its record damaged or
missing) is treated the same way: not deduplicated, replaced and *healed* by the next put.

Connections are per thread (SQLite connections must not be shared); writes are serialised
by a lock.
"""

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from engine.core.ids import ChunkId
from engine.store.dbfiles import connect_ro
from engine.store.pack import SealedPack
from engine.util import failpoints

_T = TypeVar("_T")

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
    plain INTEGER NOT NULL,
    condemned INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
"""
_BAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS bad_chunks(
    id BLOB PRIMARY KEY,
    pack TEXT,
    offset INTEGER,
    reason TEXT NOT NULL,
    since TEXT NOT NULL
) WITHOUT ROWID;
"""
_UPLOADS_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads(
    name TEXT PRIMARY KEY,
    started INTEGER NOT NULL
);
"""
_LOCKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS locks(
    name TEXT PRIMARY KEY,
    until INTEGER NOT NULL
);
"""
# locks: in a bucket with object lock (``engine.store.retention``), the date each pack (by
# name) and each other store object (by key: config.json, keys/key) is locked until, as last
# put or renewed. A missing row is an unknown date (an index rebuilt from the bucket): the
# next renewal sets it. Rows of packs that are gone are harmless and dropped by GC.
# uploads: a store whose packs live in a bucket (``engine.store.remote``) records the intent
# to upload a sealed pack here, durably, before the PUT; indexing the pack (``add_pack``,
# ``replace_packs``) clears it in the same transaction. What open = recover finds left names
# a pack whose upload a killed writer began: never reclaimed while in flight, and never kept
# forever after.
# bad_chunks: chunks verify found damaged (pack/offset: the bad record; NULL: missing). A bad
# chunk does not deduplicate (``has`` is false), so the next writer that produces its data
# stores a good record; ``add_pack`` repoints the row to it and drops the id from the list
# in the same transaction (the new pack is sealed and durable before that, so a crash leaves
# either the old row and the mark, or the new row without it).


_IN_BATCH = 500  # ids per ``IN (...)`` query (SQLite's variable limit is far above)
_BAD_WRITE_TIMEOUT = 60.0  # seconds a read-only open waits for the writer's transaction


@dataclass(frozen=True, slots=True)
class Location:
    pack: str
    offset: int
    length: int
    plain_len: int


@dataclass(frozen=True)
class BadChunk:
    """A chunk verify found damaged: its record at ``pack``/``offset`` fails its checks, or
    (``pack`` None) it is referenced but not stored."""

    chunk_id: ChunkId
    pack: str | None
    offset: int | None
    reason: str
    since: str  # RFC 3339 time of the finding


@dataclass(frozen=True)
class PackRow:
    name: str
    size: int
    records: int


@dataclass(frozen=True)
class PackUsage:
    name: str
    size: int
    records: int
    live: int  # rows located in the pack (live or condemned-but-kept)
    live_bytes: int  # their record bytes


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
        self.note: str | None = None  # how a read-only open had to degrade (a full disk)
        conn = self._conn()
        if not readonly:
            conn.executescript(_SCHEMA + _BAD_SCHEMA + _UPLOADS_SCHEMA + _LOCKS_SCHEMA)
            if not self._has_condemned(conn):  # a store from before GC: add the column
                conn.execute("ALTER TABLE chunks ADD COLUMN condemned INTEGER NOT NULL DEFAULT 0")
        # ``has``: 1 if live. A read-only open of an older index may lack the column/table.
        live = "condemned = 0" if self._has_condemned(conn) else "1"
        if self._has_bad_table(conn):
            live += " AND NOT EXISTS(SELECT 1 FROM bad_chunks b WHERE b.id = chunks.id)"
        self._has_sql = f"SELECT {live} FROM chunks WHERE id = ?"

    @staticmethod
    def _has_condemned(conn: sqlite3.Connection) -> bool:
        return any(r[1] == "condemned" for r in conn.execute("PRAGMA table_info(chunks)"))

    @staticmethod
    def _has_bad_table(conn: sqlite3.Connection) -> bool:
        return bool(
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bad_chunks'"
            ).fetchone()
        )

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._readonly:
                conn, note = connect_ro(self.path)
                self.note = self.note or note
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

    def packs_of(self, chunk_ids: list[bytes]) -> dict[bytes, str]:
        """The pack of each indexed chunk among ``chunk_ids`` (unindexed ones are absent);
        batched: a DiskMap block costs a few queries, not one per slot."""
        out: dict[bytes, str] = {}
        conn = self._conn()
        for i in range(0, len(chunk_ids), _IN_BATCH):
            batch = chunk_ids[i : i + _IN_BATCH]
            marks = ",".join("?" * len(batch))
            out.update(
                conn.execute(
                    "SELECT c.id, p.name FROM chunks c JOIN packs p ON p.id = c.pack "
                    f"WHERE c.id IN ({marks})",
                    batch,
                ).fetchall()
            )
        return out

    def has(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored, not condemned and not bad (those are stored again)."""
        row = self._conn().execute(self._has_sql, (chunk_id,)).fetchone()
        return row is not None and row[0] == 1

    def add_pack(self, sealed: SealedPack) -> list[ChunkId]:
        """Add a sealed pack and its entries durably, in one transaction. A chunk in the
        pack that is condemned or bad is repointed to it; bad ones are *healed* (dropped
        from ``bad_chunks``) and returned."""
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
                    "INSERT INTO chunks(id, pack, offset, length, plain) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET pack = excluded.pack, offset = excluded.offset, "
                    "length = excluded.length, plain = excluded.plain, condemned = 0 "
                    "WHERE chunks.condemned != 0 "
                    "OR EXISTS(SELECT 1 FROM bad_chunks b WHERE b.id = excluded.id)",
                    (
                        (e.chunk_id, pack_id, e.offset, e.length, e.plain_len)
                        for e in sealed.entries
                    ),
                )
                healed: list[ChunkId] = []
                if conn.execute("SELECT 1 FROM bad_chunks LIMIT 1").fetchone():
                    healed = [
                        ChunkId(r[0])
                        for r in conn.execute(
                            "DELETE FROM bad_chunks WHERE id IN "
                            "(SELECT id FROM chunks WHERE pack = ?) RETURNING id",
                            (pack_id,),
                        ).fetchall()
                    ]
                conn.execute("DELETE FROM uploads WHERE name = ?", (sealed.name,))
                failpoints.hit("store.index.before_commit")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        failpoints.hit("store.index.after_commit")
        return healed

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

    # --- garbage collection (engine.maint.gc; protocol in the engine.store docstring) -------

    def _write(self, statements: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``statements`` in one short write transaction; returns what it returns."""
        conn = self._conn()
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = statements(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n

    # (Membership is tested with EXISTS on mark's primary key: ``IN (SELECT …)`` would copy
    # the whole mark table into a temporary index for every statement.)
    # GC works on id ranges of about ``batch`` rows, each in a short transaction run wholly by
    # SQLite (no per-row Python, so the GIL stays free for the backups beside it), against a
    # work database attached as ``gc`` holding ``mark(id)`` and ``young(id)`` (pack ids).

    @contextmanager
    def gc_attached(self, work: Path) -> Iterator[None]:
        """Attach GC's work database to this thread's connection for the block."""
        conn = self._conn()
        conn.execute("ATTACH DATABASE ? AS gc", (str(work),))
        try:
            yield
        finally:
            conn.execute("DETACH DATABASE gc")

    def gc_ranges(self, batch: int) -> Iterator[tuple[bytes, bytes]]:
        """``(lo, hi]`` id ranges of about ``batch`` rows covering the index (read lazily)."""
        lo = b""
        while True:
            row = (
                self._conn()
                .execute(
                    "SELECT id FROM chunks WHERE id > ? ORDER BY id LIMIT 1 OFFSET ?",
                    (lo, batch - 1),
                )
                .fetchone()
            )
            if row is None:
                last = self._conn().execute("SELECT max(id) FROM chunks WHERE id > ?", (lo,))
                hi = last.fetchone()[0]
                if hi is not None:
                    yield lo, hi
                return
            yield lo, row[0]
            lo = row[0]

    def gc_judge(self, lo: bytes, hi: bytes, max_pack: int) -> tuple[int, int]:
        """Absolve marked condemned rows; condemn (-1) unmarked live rows of packs up to
        ``max_pack`` not in ``gc.young``. Returns (absolved, condemned)."""

        def run(c: sqlite3.Connection) -> tuple[int, int]:
            absolved = c.execute(
                "UPDATE chunks SET condemned = 0 WHERE id > ? AND id <= ? AND condemned != 0 "
                "AND EXISTS(SELECT 1 FROM gc.mark m WHERE m.id = chunks.id)",
                (lo, hi),
            ).rowcount
            condemned = c.execute(
                "UPDATE chunks SET condemned = -1 WHERE id > ? AND id <= ? AND condemned = 0 "
                "AND pack <= ? AND NOT EXISTS(SELECT 1 FROM gc.mark m WHERE m.id = chunks.id) "
                "AND pack NOT IN (SELECT id FROM gc.young)",
                (lo, hi, max_pack),
            ).rowcount
            return absolved, condemned

        return self._write(run)

    def gc_stamp(self, lo: bytes, hi: bytes, stamp: int) -> int:
        """Write ``stamp`` on the rows condemned with the placeholder -1."""
        return self._write(
            lambda c: (
                c.execute(
                    "UPDATE chunks SET condemned = ? WHERE id > ? AND id <= ? AND condemned = -1",
                    (stamp, lo, hi),
                ).rowcount
            )
        )

    def gc_delete(self, lo: bytes, hi: bytes, cutoff: int) -> int:
        """Delete unmarked rows condemned at a stamp ``<= cutoff`` (a revived row is kept)."""
        return self._write(
            lambda c: (
                c.execute(
                    "DELETE FROM chunks WHERE id > ? AND id <= ? AND condemned BETWEEN 1 AND ? "
                    "AND NOT EXISTS(SELECT 1 FROM gc.mark m WHERE m.id = chunks.id)",
                    (lo, hi, cutoff),
                ).rowcount
            )
        )

    def gc_unreferenced(self) -> tuple[int, int, int]:
        """(count, record bytes, how many condemned) of the rows not in ``gc.mark``."""
        row = (
            self._conn()
            .execute(
                "SELECT count(*), coalesce(sum(length), 0), count(nullif(condemned, 0)) "
                "FROM chunks WHERE NOT EXISTS(SELECT 1 FROM gc.mark m WHERE m.id = chunks.id)"
            )
            .fetchone()
        )
        return int(row[0]), int(row[1]), int(row[2])

    def pack_usage(self) -> list[PackUsage]:
        """Every pack with the count and record bytes of the rows located in it."""
        rows = self._conn().execute(
            "SELECT p.name, p.size, p.records, count(c.id), coalesce(sum(c.length), 0) "
            "FROM packs p LEFT JOIN chunks c ON c.pack = p.id GROUP BY p.id ORDER BY p.id"
        )
        return [PackUsage(*r) for r in rows]

    def pack_rows(
        self, name: str, after: bytes = b"", limit: int = 5_000
    ) -> list[tuple[ChunkId, Location]]:
        """Up to ``limit`` rows located in one pack with ids above ``after``, in id order
        (page on with the last id: a pack of tiny records can hold 10^5 rows)."""
        rows = self._conn().execute(
            "SELECT c.id, p.name, c.offset, c.length, c.plain FROM chunks c "
            "JOIN packs p ON p.id = c.pack WHERE p.name = ? AND c.id > ? ORDER BY c.id LIMIT ?",
            (name, after, limit),
        )
        return [(ChunkId(cid), Location(*loc)) for cid, *loc in rows]

    def replace_packs(
        self, sealed: SealedPack | None, sources: list[str], retire: list[str]
    ) -> int:
        """One transaction: rows located in ``sources`` whose chunk ``sealed`` holds move to
        it; then the packs in ``retire`` are forgotten with any rows still in them. Returns
        how many rows moved. ``sealed`` must be a pack on disk that is not indexed yet."""

        def pack_ids(conn: sqlite3.Connection, names: list[str]) -> list[int]:
            return [
                r[0]
                for name in names
                if (r := conn.execute("SELECT id FROM packs WHERE name = ?", (name,)).fetchone())
            ]

        def run(conn: sqlite3.Connection) -> int:
            ids = pack_ids(conn, sources)
            moved = 0
            if sealed is not None:
                conn.execute("DELETE FROM uploads WHERE name = ?", (sealed.name,))
                new_id = conn.execute(
                    "INSERT INTO packs(name, size, records) VALUES (?, ?, ?)",
                    (sealed.name, sealed.size, len(sealed.entries)),
                ).lastrowid
                marks = ",".join("?" * len(ids)) or "NULL"
                moved = conn.executemany(
                    "UPDATE chunks SET pack = ?, offset = ?, length = ? "
                    f"WHERE id = ? AND pack IN ({marks})",
                    (
                        (new_id, e.offset, e.length, e.chunk_id, *ids)
                        # in id order: B-tree pages are visited once, not once per row
                        for e in sorted(sealed.entries, key=lambda e: e.chunk_id)
                    ),
                ).rowcount
            for pack_id in pack_ids(conn, retire):
                conn.execute("DELETE FROM chunks WHERE pack = ?", (pack_id,))
                conn.execute("DELETE FROM packs WHERE id = ?", (pack_id,))
            failpoints.hit("gc.index.before_commit")
            return moved

        return self._write(run)

    # --- bad chunks (engine.maint.verify marks them, the next put of their data heals) -----

    @contextmanager
    def _bad_writer(self) -> Iterator[sqlite3.Connection]:
        """A connection that may write ``bad_chunks``: verify runs in a read-only open
        beside the writer process, so a read-only index opens a short-lived one (SQLite
        serialises it with the writer's transactions)."""
        if not self._readonly:
            with self._lock:
                yield self._conn()
            return
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BAD_WRITE_TIMEOUT)
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(_BAD_SCHEMA)
            yield conn
        finally:
            conn.close()

    def mark_bad(self, marks: Iterable[BadChunk]) -> int:
        """Record damaged chunks; returns how many were marked. A mark naming a pack holds
        only while the index still locates the chunk at that pack and offset (a writer may
        have replaced it meanwhile); a mark without a pack (the chunk is missing) only while
        the chunk is not indexed."""
        located = [
            (m.chunk_id, m.pack, m.offset, m.reason, m.since, m.chunk_id, m.pack, m.offset)
            for m in marks
            if m.pack is not None
        ]
        missing = [(m.chunk_id, m.reason, m.since, m.chunk_id) for m in marks if m.pack is None]
        n = 0
        with self._bad_writer() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if located:
                    n += conn.executemany(
                        "INSERT OR REPLACE INTO bad_chunks(id, pack, offset, reason, since) "
                        "SELECT ?, ?, ?, ?, ? WHERE EXISTS(SELECT 1 FROM chunks c JOIN packs p "
                        "ON p.id = c.pack WHERE c.id = ? AND p.name = ? AND c.offset = ?)",
                        located,
                    ).rowcount
                if missing:
                    n += conn.executemany(
                        "INSERT OR REPLACE INTO bad_chunks(id, pack, offset, reason, since) "
                        "SELECT ?, NULL, NULL, ?, ? "
                        "WHERE NOT EXISTS(SELECT 1 FROM chunks WHERE id = ?)",
                        missing,
                    ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n

    def unmark_bad(self, chunk_ids: Iterable[bytes]) -> int:
        """Forget marks (a chunk that reads back correctly after all, or a lost one no longer
        referenced or indexed); returns how many."""
        rows = [(cid,) for cid in chunk_ids]
        with self._bad_writer() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = conn.executemany("DELETE FROM bad_chunks WHERE id = ?", rows).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return n

    def bad_chunks(self) -> list[BadChunk]:
        """Every marked chunk (few: damage, not data), in id order."""
        conn = self._conn()
        if not self._has_bad_table(conn):
            return []
        rows = conn.execute(
            "SELECT id, pack, offset, reason, since FROM bad_chunks ORDER BY id"
        ).fetchall()
        return [BadChunk(ChunkId(cid), *rest) for cid, *rest in rows]

    # --- upload intents (a store whose packs live in a bucket) ------------------------------

    def intend_upload(self, name: str, now: int) -> None:
        """Record, durably, that pack ``name`` is about to be uploaded (see ``uploads``)."""
        self._write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO uploads(name, started) VALUES (?, ?)", (name, now)
            )
        )

    def end_upload(self, names: Iterable[str]) -> None:
        """Forget intents (their packs were indexed, or their objects removed)."""
        self._write(
            lambda c: c.executemany("DELETE FROM uploads WHERE name = ?", ((n,) for n in names))
        )

    def uploads(self) -> dict[str, int]:
        """Upload intents not cleared: {pack name: unix time the upload began}."""
        conn = self._conn()
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'uploads'"
        ).fetchone():
            return {}  # a read-only open of an index from before buckets
        return dict(conn.execute("SELECT name, started FROM uploads").fetchall())

    # --- object lock dates (a store in a bucket with object lock) ----------------------------

    def set_locks(self, dates: dict[str, int]) -> None:
        """Record lock dates {pack name or key: epoch seconds} (see ``locks``)."""
        self._write(
            lambda c: c.executemany(
                "INSERT INTO locks(name, until) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET until = max(until, excluded.until)",
                dates.items(),
            )
        )

    def locks(self, names: Iterable[str]) -> dict[str, int]:
        """The recorded lock dates of ``names`` (unknown ones are absent)."""
        conn = self._conn()
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'locks'"
        ).fetchone():
            return {}  # a read-only open of an index from before object lock
        wanted = list(names)
        out: dict[str, int] = {}
        for i in range(0, len(wanted), _IN_BATCH):
            batch = wanted[i : i + _IN_BATCH]
            marks = ",".join("?" * len(batch))
            out.update(
                conn.execute(f"SELECT name, until FROM locks WHERE name IN ({marks})", batch)
            )
        return out

    def forget_locks(self, names: Iterable[str]) -> None:
        """Drop the dates of objects deleted from the bucket."""
        self._write(
            lambda c: c.executemany("DELETE FROM locks WHERE name = ?", ((n,) for n in names))
        )

    def pack_size(self, name: str) -> int | None:
        row = self._conn().execute("SELECT size FROM packs WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

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
