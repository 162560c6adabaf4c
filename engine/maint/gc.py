"""Garbage collection: free the chunks no snapshot references, repack sparse packs, keep
retired packs in a trash for a grace period. Runs beside backups (DESIGN §4.9); the protocol
that makes that safe is in the ``engine.store`` docstring. One run::

    gc lock (one GC at a time)           lease watch starts: every lease live from here on
      │                                    counts for the delete cutoff
      ├─ 1 prune lock: delete removed/<id> past the grace; list snapshots/ + removed/; unlock
      ├─ 2 mark: every listed manifest's config chunk and DiskMap ids → work db ``mark``
      ├─ 3 judge (index in id order, batches): marked+condemned → absolved; unmarked+live in
      │      an old pack → condemned (−1, then stamped after the commit); −1 left by a
      │      killed run → stamped
      ├─ 4 delete: rows condemned at a stamp older than the oldest watched lease, unmarked
      ├─ 5 packs: no rows → trash; live bytes / size < threshold → records copied into new
      │      packs (CRC checked, rate-limited), then per group: seal new pack → link sources
      │      into trash/ → one index transaction (rows move, sources forgotten) → unlink
      └─ 6 trash: files older than the grace deleted

While any lease is live GC paces itself (``busy_share``: it sleeps after each batch so that
it works at most that share of wall time), so backups keep their speed. A pack holding a
damaged record is not repacked (its good records may already have moved); verify reports it.

Every step commits in short transactions and is idempotent, so a run killed anywhere leaves
a consistent store (open = recover finishes or undoes a half-retired pack) and the next run
completes the work. Nothing is deleted if any manifest or DiskMap cannot be read: a GC that
cannot see every reference must not sweep.

Memory is bounded independently of store size: the marked set is a SQLite table in
``STORE/gc/mark.db`` (one B-tree row per distinct referenced chunk, ~50 bytes on disk) with
its page cache capped at ``_CACHE_KIB``; Python holds one DiskMap block (32 Ki ids, 1 MiB),
one batch of ``_BATCH`` index rows, one record, and the entries of one new pack (at most
``_REPACK_RECORDS``). Measured on a synthetic 2 M-chunk store (``tests/bench/gc_bench.py``:
0.875 M marked, 1.125 M deleted, 107 packs repacked): peak RSS 68 MiB for the whole process,
27 MiB above the open store; ``tests/integration/test_gc_memory.py`` asserts < 100 MiB
(a Python set of the 2 M ids alone would take ~200 MiB).
"""

import fcntl
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import CorruptRecord, SnapshotNotFound, StoreError, StoreLocked
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.maint.gc_defaults import DEFAULT_GRACE, DEFAULT_REPACK_THRESHOLD
from engine.maint.prune import REMOVED_DIR, prune_lock, removed_snapshots
from engine.store import manifest as manifest_mod
from engine.store.codec import check_crc
from engine.store.diskmap import DiskMap
from engine.store.failure import write_failure
from engine.store.layout import (
    MANIFEST_NAME,
    REMOTE_TRASH,
    Layout,
    read_remote_trash,
    remote_trash,
)
from engine.store.manifest import Manifest
from engine.store.pack import PACK_SUFFIX, PackWriter, SealedPack, pack_path
from engine.store.retention import when
from engine.util import failpoints
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

# GC's share of wall time while backups run: on the 2-core reference machine a GC working
# flat out beside a backup cut its throughput to ~0.5 (one core each); at 0.25 the backup
# keeps >= 0.8 of its speed (``python -m tests.bench gc``) and GC still finishes.
DEFAULT_BUSY_SHARE: Final = 0.25
# Packs sealed less than this before the oldest live lease began are treated as that
# session's: their unreferenced chunks are not condemned yet (it is about to reference them).
# Only an optimisation — safety never depends on pack times (file mtimes).
YOUNG_PACK_MARGIN: Final = timedelta(minutes=5)
_BATCH: Final = 5_000  # index rows per judge/delete transaction: milliseconds, never stalls
#                        the sealer's index commits for long
_CACHE_KIB: Final = 16 * 1024  # page cache of the mark database
# Insert one DiskMap block (?1 ids in the blob ?2) into ``mark``, skipping ZERO (?3).
_MARK_BLOCK: Final = (
    "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?1) "
    "INSERT OR IGNORE INTO mark SELECT x FROM "
    "(SELECT substr(?2, i * 32 + 1, 32) AS x FROM s) WHERE x != ?3"
)
# Records per new pack at most (besides the pack size): its writer keeps one entry per record
# in RAM and its index commit moves them in one transaction; a 64 MiB pack of well-compressed
# records would otherwise hold 10^5–10^6 of them.
_REPACK_RECORDS: Final = 16 * 1024


Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class GcOptions:
    dry_run: bool = False
    repack_threshold: float = DEFAULT_REPACK_THRESHOLD
    grace: timedelta = DEFAULT_GRACE
    rate_limit: float | None = None  # bytes per second of repack I/O (read + write)
    young_pack_margin: timedelta = YOUNG_PACK_MARGIN
    # While any session holds a lease, GC works at most this share of wall time (it sleeps
    # after each batch in proportion to the batch's time): backups come first. 1.0: no pause.
    busy_share: float = DEFAULT_BUSY_SHARE
    now: Callable[[], datetime] = lambda: datetime.now(UTC)  # injected in tests
    sleep: Callable[[float], None] = time.sleep
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.repack_threshold <= 1.0:
            raise ValueError(f"repack threshold {self.repack_threshold} is not within 0..1")
        if not 0.0 < self.busy_share <= 1.0:
            raise ValueError(f"busy share {self.busy_share} is not within (0, 1]")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("the rate limit must be positive")


@dataclass
class GcResult:
    dry_run: bool
    snapshots: int = 0  # marked from (committed + removed within the grace period)
    removed_expired: list[str] = field(default_factory=list)  # removed/<id> deleted
    marked_chunks: int = 0
    index_chunks: int = 0
    unreferenced_chunks: int = 0
    unreferenced_bytes: int = 0
    condemned: int = 0
    absolved: int = 0
    deleted_chunks: int = 0
    deferred_chunks: int = 0  # condemned, kept because a lease older than that is live
    packs_trashed: int = 0  # without a live record
    # Packs in a bucket with object lock kept in the trash past the grace period because
    # their lock date is not yet past (or the bucket refused the delete), and the latest date.
    lock_waiting: int = 0
    lock_waits_until: int | None = None
    packs_repacked: int = 0
    packs_written: int = 0
    bytes_copied: int = 0
    bytes_retired: int = 0  # pack bytes moved to the trash
    trash_deleted: int = 0
    trash_bytes_freed: int = 0
    leases: list[str] = field(default_factory=list)  # sessions live during the run
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def doc(self) -> dict[str, object]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        what = "would " if self.dry_run else ""
        out = [
            f"marked {self.marked_chunks} chunks from {self.snapshots} snapshots; "
            f"{self.unreferenced_chunks} of {self.index_chunks} chunks unreferenced "
            f"({self.unreferenced_bytes} bytes)",
        ]
        if self.removed_expired:
            out.append(f"{what}delete {len(self.removed_expired)} removed snapshots past grace")
        if not self.dry_run:
            out.append(
                f"condemned {self.condemned}, absolved {self.absolved}, deleted "
                f"{self.deleted_chunks} chunks; {self.deferred_chunks} wait for running "
                "sessions"
            )
        out.append(
            f"{what}trash {self.packs_trashed} empty packs, {what}repack {self.packs_repacked} "
            f"packs into {self.packs_written} ({self.bytes_copied} bytes copied, "
            f"{self.bytes_retired} pack bytes to trash)"
        )
        out.append(f"{what}empty {self.trash_deleted} trash files ({self.trash_bytes_freed} bytes)")
        if self.lock_waiting:
            until = (
                ""
                if self.lock_waits_until is None
                else f", the last until {when(self.lock_waits_until)}"
            )
            out.append(
                f"{self.lock_waiting} packs in the bucket wait for their object lock dates{until}"
            )
        out += [f"live session: {s}" for s in self.leases]
        out += [f"note: {n}" for n in self.notes]
        return out


@contextmanager
def gc_lock(layout: Layout) -> Iterator[None]:
    """``STORE/gc/lock``, exclusive; raises StoreLocked if another GC holds it."""
    layout.gc.mkdir(exist_ok=True)
    fd = os.open(layout.gc / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(path=layout.root, reason="another GC is running") from None
        yield
    finally:
        os.close(fd)


def gc(store: "Store", options: GcOptions | None = None) -> GcResult:
    """Collect garbage in a store opened for writing (this process holds the writer lock,
    so every session that can reference chunks runs here and holds a lease).

    Raises StoreError for a read-only store, StoreLocked if a GC runs, PruneLocked if a
    prune holds its lock during step 1, and whatever reading a manifest or DiskMap raises
    (nothing has been deleted then).
    """
    opts = options or GcOptions()
    if not store.writable:
        raise StoreError(path=store.path, reason="GC needs the store opened for writing")
    started = time.monotonic()
    try:
        result = _gc(store, opts)
    except (OSError, sqlite3.Error) as e:
        # Each step leaves the store consistent (open = recover finishes a half-retired
        # pack); a full disk or an I/O error is reported naming the store, never raw.
        raise write_failure(store.path, "garbage collection", e) from e
    result.seconds = time.monotonic() - started
    return result


def _gc(store: "Store", opts: GcOptions) -> GcResult:
    result = GcResult(dry_run=opts.dry_run)
    layout = store.layout
    with gc_lock(layout), store.leases.watch() as watch:
        work = layout.gc / "mark.db"
        for leftover in layout.gc.glob("mark.db*"):
            leftover.unlink()
        db = sqlite3.connect(work, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.execute("CREATE TABLE mark(id BLOB PRIMARY KEY) WITHOUT ROWID")
            db.execute("CREATE TABLE young(id INTEGER PRIMARY KEY)")
            db.execute("ATTACH DATABASE ? AS idx", (f"file:{layout.index}?mode=ro",))
            run = _Run(store, opts, result, db, lambda: watch.oldest)
            run.list_and_expire()
            run.mark()
            with store.index.gc_attached(work):
                run.judge()
                run.delete()
            run.packs()
            run.empty_trash()
            result.leases = [f"{lease.kind} {lease.what}" for lease in watch.seen]
        finally:
            db.close()
            for leftover in layout.gc.glob("mark.db*"):
                leftover.unlink()
    return result


class _RateLimit:
    """Sleep so that bytes pass at most at ``rate`` per second (None: no limit)."""

    def __init__(self, rate: float | None, sleep: Callable[[float], None]):
        self.rate, self.sleep = rate, sleep
        self.start = time.monotonic()
        self.bytes = 0

    def consume(self, n: int) -> None:
        if self.rate is None:
            return
        self.bytes += n
        ahead = self.bytes / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            self.sleep(ahead)


class _Pacer:
    """Sleeps after each batch of GC work while a lease is live (see ``busy_share``)."""

    def __init__(self, share: float, busy: Callable[[], bool], sleep: Callable[[float], None]):
        self.share, self.busy, self.sleep = share, busy, sleep
        self.mark = time.monotonic()

    def step(self) -> None:
        worked = time.monotonic() - self.mark
        if self.share < 1.0 and self.busy():
            self.sleep(worked * (1.0 / self.share - 1.0))
        self.mark = time.monotonic()


class _Run:
    def __init__(
        self,
        store: "Store",
        opts: GcOptions,
        result: GcResult,
        db: sqlite3.Connection,
        oldest_lease: Callable[[], int | None],
    ):
        self.store, self.opts, self.result, self.db = store, opts, result, db
        self.layout = store.layout
        self.oldest_lease = oldest_lease
        self.pace = _Pacer(opts.busy_share, lambda: bool(store.leases.live()), opts.sleep).step
        self.snapshots: list[str] = []
        self.max_pack = 0
        self.writer: PackWriter | None = None  # the new pack repacked records go to
        self.sources: list[str] = []  # packs with records in it
        self.complete: list[str] = []  # packs whose every record is in it or committed

    def progress(self, step: str, done: int, total: int) -> None:
        if self.opts.progress is not None:
            self.opts.progress(step, done, total)

    # --- 1: removed snapshots past the grace period, and what to mark from --------------------

    def list_and_expire(self) -> None:
        now = self.opts.now()
        # packs sealed from now on belong to running sessions: never condemned from (an
        # optimisation like the young packs; leases make it safe either way)
        self.max_pack = self.db.execute("SELECT coalesce(max(id), 0) FROM idx.packs").fetchone()[0]
        with prune_lock(self.layout, "collect garbage"):
            for r in removed_snapshots(self.layout):
                has_manifest = (r.path / MANIFEST_NAME).exists()
                if has_manifest and (r.removed_at is None or r.removed_at + self.opts.grace > now):
                    continue
                self.result.removed_expired.append(r.snapshot_id)
                if not self.opts.dry_run:
                    # manifest first: a half-deleted directory is never a snapshot again
                    (r.path / MANIFEST_NAME).unlink(missing_ok=True)
                    fsync_dir(r.path)
                    failpoints.hit("gc.expire.unlinked")
                    shutil.rmtree(r.path)
                    fsync_dir(r.path.parent)
            removed = self.layout.root / REMOVED_DIR
            listed = set(self.layout.committed_snapshots())
            if removed.exists():
                listed |= {p.parent.name for p in removed.glob(f"*/{MANIFEST_NAME}")}
            listed -= set(self.result.removed_expired)  # a dry run plans as if deleted
        failpoints.hit("gc.listed")
        self.snapshots = sorted(listed)
        self.result.snapshots = len(self.snapshots)

    # --- 2: mark ------------------------------------------------------------------------------

    def _manifest(self, sid: str) -> tuple[Manifest, Path]:
        """A listed snapshot's manifest from snapshots/ or removed/ (prune may move it)."""
        for _ in range(3):
            for d in (self.layout.snapshot_dir(sid), self.layout.root / REMOVED_DIR / sid):
                try:
                    raw = (d / MANIFEST_NAME).read_bytes()
                except FileNotFoundError:
                    continue
                return manifest_mod.decode(raw, self.store.keys, sid, d / MANIFEST_NAME), d
        raise SnapshotNotFound(snapshot=sid, reason="its manifest vanished during GC")

    def mark(self) -> None:
        db = self.db
        db.execute("BEGIN")
        for n, sid in enumerate(self.snapshots):
            manifest, d = self._manifest(sid)
            if manifest.config is not None:
                db.execute(
                    "INSERT OR IGNORE INTO mark VALUES (?)",
                    (bytes.fromhex(manifest.config.chunk_id),),
                )
            for disk in manifest.disks:
                with DiskMap(d / disk.diskmap, bytes.fromhex(disk.diskmap_checksum)) as dm:
                    for block in dm.iter_blocks():
                        # the block's ids are split and inserted by SQLite itself: no Python
                        # object per id, and the GIL is free for backups meanwhile
                        db.execute(_MARK_BLOCK, (len(block) // CHUNK_ID_SIZE, block, ZERO_ID))
                        self.pace()
            self.progress("mark", n + 1, len(self.snapshots))
        db.execute("COMMIT")
        self.result.marked_chunks = db.execute("SELECT count(*) FROM mark").fetchone()[0]
        failpoints.hit("gc.marked")

    # --- 3: judge -----------------------------------------------------------------------------

    def _young_packs(self) -> set[int]:
        """Index ids of packs sealed after the oldest live lease began (minus the margin)."""
        oldest = self.oldest_lease()
        if oldest is None:
            return set()
        since = oldest / 1e9 - self.opts.young_pack_margin.total_seconds()
        young = set()
        for pack_id, name in self.db.execute("SELECT id, name FROM idx.packs").fetchall():
            try:
                if pack_path(self.layout.packs, name).stat().st_mtime >= since:
                    young.add(pack_id)
            except FileNotFoundError:
                continue
        return young

    def judge(self) -> None:
        index, res = self.store.index, self.result
        self.db.executemany("INSERT INTO young VALUES (?)", ((i,) for i in self._young_packs()))
        res.index_chunks = index.stats().chunks
        res.unreferenced_chunks, res.unreferenced_bytes, _ = index.gc_unreferenced()
        if self.opts.dry_run:
            return
        done = 0
        for lo, hi in index.gc_ranges(_BATCH):
            # Invisible to has() from this commit on; stamped only after it, so every lease
            # that could have deduplicated against one of them began before the stamp.
            absolved, condemned = index.gc_judge(lo, hi, self.max_pack)
            res.absolved += absolved
            res.condemned += condemned
            failpoints.hit("gc.condemned")
            index.gc_stamp(lo, hi, self.store.leases.clock.now())  # also -1 a crash left
            failpoints.hit("gc.stamped")
            self.pace()
            done += _BATCH
            self.progress("judge", min(done, res.index_chunks), res.index_chunks)

    # --- 4: delete ----------------------------------------------------------------------------

    def _cutoff(self) -> int:
        oldest = self.oldest_lease()
        return (oldest - 1) if oldest is not None else self.store.leases.clock.now()

    def delete(self) -> None:
        if self.opts.dry_run:
            return
        res, index = self.result, self.store.index
        for lo, hi in index.gc_ranges(_BATCH):
            n = index.gc_delete(lo, hi, self._cutoff())
            if n:
                res.deleted_chunks += n
                failpoints.hit("gc.deleted")
            self.pace()
            self.progress("delete", res.deleted_chunks, res.unreferenced_chunks)
        res.deferred_chunks = index.gc_unreferenced()[2]

    # --- 5: packs -----------------------------------------------------------------------------

    def packs(self) -> None:
        opts, res = self.opts, self.result
        if opts.dry_run:
            self._plan_dry()
            return
        usage = self.store.index.pack_usage()
        empty = [u for u in usage if u.live == 0]
        sparse = [u for u in usage if u.live and u.live_bytes < opts.repack_threshold * u.size]
        total = len(empty) + len(sparse)
        for n, u in enumerate(empty):
            self._retire(None, [], [u.name])
            res.packs_trashed += 1
            res.bytes_retired += u.size
            self.progress("trash", n + 1, total)
        limit = _RateLimit(opts.rate_limit, opts.sleep)
        try:
            for n, u in enumerate(sparse):
                try:
                    self._copy(u.name, limit)
                except CorruptRecord as e:  # its good records moved so far stay moved
                    res.notes.append(f"pack {u.name} not repacked: {e} (see tessera store verify)")
                    continue
                self.complete.append(u.name)  # retired by the commit of its last records
                res.packs_repacked += 1
                res.bytes_retired += u.size
                self.progress("repack", len(empty) + n + 1, total)
            if self.writer is not None or self.complete:
                self._flush()
        except (OSError, sqlite3.Error) as e:
            # A failed write (a full disk) abandons the new pack: its records were never
            # indexed, and the packs it copied from are still indexed and whole.
            what = "a repacked pack" if self.writer is None else f"pack {self.writer.name}"
            raise write_failure(self.layout.root, what, e) from e
        finally:
            if self.writer is not None:
                self.writer.abort()
                self.writer = None

    def _copy(self, name: str, limit: _RateLimit) -> None:
        """Append every record located in pack ``name`` to the open new pack, CRC checked;
        the new pack is sealed and committed whenever full (also in the middle of a source)."""
        index, pack_size = self.store.index, self.store.config.pack_size
        with self.store.pack_file(name).open("rb") as f:
            after = b""
            while rows := index.pack_rows(name, after, _BATCH):
                self.pace()
                after = rows[-1][0]
                for cid, loc in sorted(rows, key=lambda r: r[1].offset):  # sequential reads
                    record = os.pread(f.fileno(), loc.length, loc.offset)
                    header = check_crc(record, name, loc.offset)
                    if header.chunk_id != cid:
                        raise CorruptRecord(
                            chunk=short(cid), pack=name, offset=loc.offset, reason="id differs"
                        )
                    if self.writer is None:
                        self.writer = PackWriter(self.layout.packs)
                    if name not in self.sources:
                        self.sources.append(name)
                    self.writer.append(cid, record, loc.plain_len)
                    self.result.bytes_copied += loc.length
                    limit.consume(2 * loc.length)
                    if self.writer.size >= pack_size or len(self.writer.entries) >= _REPACK_RECORDS:
                        self._flush()

    def _flush(self) -> None:
        """Seal the open new pack (if any), move its rows, retire the complete sources."""
        sealed = None
        if self.writer is not None:
            try:
                sealed = self.writer.seal()
            except BaseException:
                self.writer.abort()
                raise
            self.result.packs_written += 1
            failpoints.hit("gc.repack.sealed")
            self.store.publish_pack(sealed)  # in a bucket: uploaded before it is indexed
        self._retire(sealed, self.sources, self.complete)
        if sealed is not None:
            self.store.note_indexed(sealed)
        self.writer, self.sources, self.complete = None, [], []

    def _plan_dry(self) -> None:
        """What step 5 would do if every unreferenced chunk were deleted now."""
        res, t = self.result, self.opts.repack_threshold
        rows = self.db.execute(
            "SELECT p.size, count(c.id), coalesce(sum(c.length), 0) FROM idx.packs p "
            "LEFT JOIN (SELECT c.pack, c.id, c.length FROM idx.chunks c "
            "WHERE EXISTS(SELECT 1 FROM mark m WHERE m.id = c.id)) c ON c.pack = p.id "
            "GROUP BY p.id"
        )
        for size, live, live_bytes in rows:
            if live == 0:
                res.packs_trashed += 1
                res.bytes_retired += size
            elif live_bytes < t * size:
                res.packs_repacked += 1
                res.bytes_retired += size
                res.bytes_copied += live_bytes
        self._empty_trash_plan()

    def _retire(self, sealed: SealedPack | None, sources: list[str], retire: list[str]) -> None:
        """Link ``retire`` into the trash, commit the index (rows of ``sources`` move into
        ``sealed``, ``retire`` is forgotten), then unlink ``retire`` from packs/."""
        trash = self.layout.trash
        if not trash.exists():
            trash.mkdir()
            fsync_dir(self.layout.root)
        stamp = int(self.opts.now().timestamp())
        remote = self.store.remote is not None
        dates = self.store.index.locks(retire) if remote else {}
        for name in retire:
            if remote:  # the object stays in the bucket until the grace period is over
                size = self.store.index.pack_size(name) or 0
                marker = trash / f"{stamp}-{name}{REMOTE_TRASH}"
                failpoints.hit("gc.retire.before_link")
                atomic_write(marker, remote_trash(size, dates.get(name)), "gc.retire.marker")
                continue
            link = trash / f"{stamp}-{name}{PACK_SUFFIX}"
            if not link.exists():
                failpoints.hit("gc.retire.before_link")
                os.link(pack_path(self.layout.packs, name), link)
        if retire:
            fsync_dir(trash, "gc.retire.before_dir_fsync")
        failpoints.hit("gc.retire.linked")
        self.store.index.replace_packs(sealed, sources, retire)
        failpoints.hit("gc.retire.committed")
        for name in retire:
            path = pack_path(self.layout.packs, name)
            failpoints.hit("gc.retire.before_unlink")
            if remote:
                self.store.remote.forget(name)  # type: ignore[union-attr]
                continue
            path.unlink()
            fsync_dir(path.parent, "gc.retire.before_unlink_fsync")
        failpoints.hit("gc.retire.unlinked")

    # --- 6: trash -----------------------------------------------------------------------------

    def _expired_trash(self) -> list[Path]:
        """Trash entries past the grace period whose object lock date (a pack in a bucket
        with object lock) is past too; the ones waiting for their date are counted in
        ``result.lock_waiting`` with the latest date."""
        now = self.opts.now().timestamp()
        grace = self.opts.grace.total_seconds()
        expired = []
        self.result.lock_waiting, self.result.lock_waits_until = 0, None
        for path in self.layout.trash_files().values():
            try:
                stamp = int(path.name.partition("-")[0])
            except ValueError:
                continue
            if stamp + grace > now:
                continue
            until = read_remote_trash(path)[1] if path.suffix == REMOTE_TRASH else None
            if until is not None and until > now:
                self._waits_for(until)
                continue
            expired.append(path)
        return sorted(expired)

    def _waits_for(self, until: int) -> None:
        self.result.lock_waiting += 1
        last = self.result.lock_waits_until
        self.result.lock_waits_until = until if last is None else max(last, until)

    def _empty_trash_plan(self) -> None:
        for path in self._expired_trash():
            self.result.trash_deleted += 1
            self.result.trash_bytes_freed += _trash_size(path)

    def empty_trash(self) -> None:
        if self.opts.dry_run:
            return
        expired = self._expired_trash()
        in_bucket = [p.stem.partition("-")[2] for p in expired if p.suffix == REMOTE_TRASH]
        if in_bucket:  # the objects first, in batches: a marker never outlives its object
            # A pack the bucket refuses to delete is still locked there (a date we did not
            # know, a clock behind the bucket's): its marker stays for the next GC.
            refused = set(self.store.delete_packs(in_bucket, keep_refused=False))
            for path in [p for p in expired if p.stem.partition("-")[2] in refused]:
                expired.remove(path)
                self.result.lock_waiting += 1
            self.store.index.forget_locks(n for n in in_bucket if n not in refused)
        for n, path in enumerate(expired):
            size = _trash_size(path)
            path.unlink()
            self.result.trash_deleted += 1
            self.result.trash_bytes_freed += size
            self.progress("trash", n + 1, len(expired))
        if expired:
            fsync_dir(self.layout.trash)


def _trash_size(path: Path) -> int:
    """The bytes a trash entry frees: the pack file, or the size a bucket's marker holds."""
    if path.suffix != REMOTE_TRASH:
        return path.stat().st_size
    return read_remote_trash(path)[0]
