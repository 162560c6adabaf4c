"""Verify, heal and repair a store (``tessera store verify``, ``tessera store repair``).

Verify runs on a read-only open, beside a backup that holds the writer lock::

    0 files      ``index.db`` and ``catalog.db`` open and pass SQLite's ``quick_check``; a
                 missing or damaged one is a finding naming the file, and the rest of the
                 run checks against a temporary copy the read-only open rebuilt from the
                 packs / manifests (``engine.store.dbfiles``); nothing is marked then
    1 packs      every indexed pack is on disk at its indexed size, and its trailer reads
                 (footer, CRC32) and lists as many records as the index (cheap, always)
    2 data       (--data / --percent) the packs of this run, oldest-verified first: every
                 record located in them is read, CRC and AEAD checked and re-hashed to its id
                 (CRC and id only where the store holds no data key), and the trailer is
                 compared with those records; a bad record's chunk
                 is marked bad in the index (``Index.mark_bad``) before the pack is recorded
                 as verified, so a killed run loses nothing it found
    3 structure  every snapshot (share-locked): manifest MAC, DiskMap checksums, and every
                 referenced chunk indexed, not bad, in a pack that is whole — streaming, with
                 only damaged ids (and the snapshots they affect) in memory
    4 marks      referenced chunks that are missing or in a broken pack are marked bad too;
                 each damaged snapshot gets ``snapshots/<id>/damaged``, and a snapshot that
                 is whole again loses its mark

Every finding is reported (never only the first), naming the pack, chunk, snapshots and VMs.
A damaged trailer is a finding of its own (kind ``trailer``): the records are intact and
indexed, but a rebuild would have to scan them; ``repair`` re-seals the pack.

Writes that fail (a full disk: ``verify/state.db``, the bad-chunk list, damage marks) are
warnings in the result, never the end of the run: verify still reads and reports. Without
its state file a run is not resumable and every pack counts as never verified.

Sampling and resumption. Per-pack state lives in ``STORE/verify/state.db`` (SQLite,
``synchronous=FULL``: each commit is atomic and durable): the time and run of each pack's
last verification, and the run in progress. A run verifies ``ceil(P % × packs)`` packs (all
for a full ``--data``), the least recently verified first, ties (never verified) broken by a
hash of the pack name salted with the run's random seed — a deterministic sample per run, so
successive 10 % runs cover the whole store in ten runs. A run records each pack as it
finishes it; a killed run is resumed by the next verify with the same percentage (the packs
it finished are skipped, its seed and size are kept), any other verify starts a new run.

Heal. A chunk in the bad list does not deduplicate (``Store.has`` is false), so the next
backup that reads its data stores a good record; ``Index.add_pack`` repoints the chunk to it
and drops it from the list in one transaction after the new pack is durable, and the store
then removes it from the damage marks (``engine.store.damage.clear_healed``).

Repair is ``engine.maint.repair``.
"""

import hashlib
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import (
    CorruptPack,
    CorruptRecord,
    IntegrityError,
    ObjectStoreError,
    PackMissing,
    SnapshotNotFound,
    StoreError,
)
from engine.core.ids import ChunkId, short
from engine.maint.check import (
    CheckResult,
    Finding,
    check_structure,
    pack_problems,
    trailer_mismatch,
    trailer_problems,
)
from engine.store.codec import check_crc
from engine.store.damage import DAMAGED_NAME, Damage, remove_damage, still_bad, write_damage
from engine.store.dbfiles import describe, os_reason, quick_check
from engine.store.index import BadChunk, Location
from engine.store.locks import reading_snapshot
from engine.util import failpoints
from engine.util.fs import fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

STATE_DIR: Final = "verify"
VERIFY_THREADS: Final = 2  # decode releases the GIL (zstd, AES, BLAKE3); 2 cores measured
_TASK_BYTES: Final = 4 * 1024 * 1024  # per thread-pool task: amortises the task overhead
_TASK_RECORDS: Final = 512
_ROWS: Final = 4096  # index rows per page of one pack: bounded memory for packs of tiny records

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs(
    name TEXT PRIMARY KEY,
    verified REAL NOT NULL,      -- unix time of the last complete verification
    run INTEGER NOT NULL,        -- the run that did it
    bad INTEGER NOT NULL         -- bad records it found
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    seed TEXT NOT NULL,
    percent REAL NOT NULL,
    planned INTEGER NOT NULL,
    finished REAL                -- NULL while the run is unfinished (killed: resumable)
);
"""


@dataclass(frozen=True)
class VerifyProgress:
    step: str  # "data" (packs read) or "structure" (snapshots walked)
    done: int
    total: int
    bytes_done: int = 0
    bytes_total: int = 0


Progress = Callable[[VerifyProgress], None]


@dataclass
class VerifyOptions:
    data: bool = False  # read and check records (implied by ``percent``)
    percent: float | None = None  # sample this share of the packs; None: all of them
    mark: bool = True  # persist bad chunks and damage marks (``False``: report only)
    threads: int = VERIFY_THREADS
    progress: Progress | None = None
    now: Callable[[], float] = time.time  # injected in tests: "oldest verified" needs times

    def __post_init__(self) -> None:
        if self.percent is not None:
            if not 0 < self.percent <= 100:
                raise ValueError(f"percent must be in (0, 100], not {self.percent}")
            self.data = True


@dataclass
class VerifyResult(CheckResult):
    data: bool = False
    percent: float = 100.0
    run: int = 0  # the data run (0: no data check)
    resumed: bool = False  # this call finished a run a killed verify began
    packs_total: int = 0
    packs_in_run: int = 0  # the run's sample size (all packs for a full run)
    packs_checked: int = 0  # packs read by this call
    packs_remaining: int = 0  # of the run, not read (0 unless interrupted)
    marked_bad: int = 0  # chunks newly added to the bad list
    damaged: list[str] = field(default_factory=list)  # damaged snapshot ids
    undamaged: list[str] = field(default_factory=list)  # snapshots whose mark was cleared
    vms: list[str] = field(default_factory=list)  # names of VMs with a damaged snapshot
    warnings: list[str] = field(default_factory=list)  # writes that failed (a full disk)
    seconds: float = 0.0

    def doc(self) -> dict[str, object]:
        return asdict(self) | {"ok": self.ok}


# --- state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    id: int
    seed: str
    planned: int
    resumed: bool


class VerifyState:
    """``STORE/verify/state.db``: per-pack last verification and the run in progress."""

    def __init__(self, root: Path, warnings: list[str] | None = None):
        """Open (create) the state file. When that fails (a full disk, a read-only store)
        and ``warnings`` is given, the reason goes there and the state lives in memory for
        this run; without ``warnings`` it raises StoreError."""
        directory = root / STATE_DIR
        self._path = directory / "state.db"
        self._warnings = warnings
        try:
            if not directory.exists():
                directory.mkdir()
                fsync_dir(root)
            self._db = sqlite3.connect(self._path, isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_STATE_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            reason = os_reason(e) if isinstance(e, OSError) else describe(e, self._path)
            if warnings is None:
                raise StoreError(
                    path=root, reason=f"verify state {self._path} is not writable: {reason}"
                ) from e
            warnings.append(
                f"verify state {self._path} is not writable ({reason}): this run is not "
                "recorded (not resumable; the next run starts over)"
            )
            self._db = sqlite3.connect(":memory:", isolation_level=None)
            self._db.executescript(_STATE_SCHEMA)

    def _record(self, sql: str, args: tuple[object, ...]) -> None:
        """A state write; a failure (a full disk) becomes one warning, then memory."""
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as e:
            if self._warnings is None:
                raise
            self._warnings.append(
                f"verify state {self._path}: {describe(e)}: the rest of this run is not recorded"
            )
            self._db.close()
            self._db = sqlite3.connect(":memory:", isolation_level=None)
            self._db.executescript(_STATE_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def begin(self, percent: float, packs: int, now: float) -> _Run:
        """Resume the unfinished run of the same percentage, or start a new one."""
        row = self._db.execute(
            "SELECT id, seed, percent, planned FROM runs WHERE finished IS NULL "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is not None and row[2] == percent:
            return _Run(row[0], row[1], row[3], resumed=True)
        planned = min(packs, math.ceil(packs * percent / 100)) if packs else 0
        seed = secrets.token_hex(8)
        self._record("UPDATE runs SET finished = ? WHERE finished IS NULL", (now,))
        self._record(
            "INSERT INTO runs(started, seed, percent, planned) VALUES (?, ?, ?, ?)",
            (now, seed, percent, planned),
        )
        row = self._db.execute("SELECT id FROM runs WHERE seed = ?", (seed,)).fetchone()
        if row is None:  # the write failed: the in-memory state that replaced the file
            self._record(
                "INSERT INTO runs(started, seed, percent, planned) VALUES (?, ?, ?, ?)",
                (now, seed, percent, planned),
            )
            row = self._db.execute("SELECT id FROM runs WHERE seed = ?", (seed,)).fetchone()
        return _Run(row[0], seed, planned, resumed=False)

    def plan(self, run: _Run, names: list[str]) -> tuple[list[str], int]:
        """(packs still to verify in ``run``, in order; how many the run already did).
        Forgets packs no longer indexed (GC retired them)."""
        known = {
            name: (verified, r)
            for name, verified, r in self._db.execute("SELECT name, verified, run FROM packs")
        }
        for gone in set(known) - set(names):
            self._record("DELETE FROM packs WHERE name = ?", (gone,))
        done = sum(1 for n in names if n in known and known[n][1] == run.id)

        def key(name: str) -> tuple[float, bytes]:
            verified = known[name][0] if name in known else -math.inf
            return verified, hashlib.blake2b((run.seed + name).encode(), digest_size=8).digest()

        todo = sorted((n for n in names if n not in known or known[n][1] != run.id), key=key)
        return todo[: max(0, run.planned - done)], done

    def verified(self, run: _Run, name: str, now: float, bad: int) -> None:
        self._record(
            "INSERT OR REPLACE INTO packs(name, verified, run, bad) VALUES (?, ?, ?, ?)",
            (name, now, run.id, bad),
        )

    def finish(self, run: _Run, now: float) -> None:
        self._record("UPDATE runs SET finished = ? WHERE id = ?", (now, run.id))

    def last_verified(self) -> dict[str, float]:
        """Each pack's last verification time (tests, status)."""
        return dict(self._db.execute("SELECT name, verified FROM packs").fetchall())


# --- verify -----------------------------------------------------------------------------------


def verify(store: "Store", options: VerifyOptions | None = None) -> VerifyResult:
    """Verify ``store`` (opened read-only or for writing) as the module docstring says.
    Raises only for what stops a verify altogether (the store or its state unreadable);
    every problem with the data is a finding."""
    opts = options or VerifyOptions()
    started = time.monotonic()
    result = VerifyResult(data=opts.data, percent=opts.percent or 100.0)
    _files_step(store, opts, result)
    bad_packs = pack_problems(store)
    for name, reason in bad_packs.items():
        result.findings.append(Finding("pack", name, reason))
    for name, reason in trailer_problems(store, bad_packs).items():
        result.findings.append(Finding("trailer", name, f"{reason}; {_RESEAL}"))
    found: dict[bytes, BadChunk] = {}  # found by this call's data step
    read: set[str] = set()  # packs whose every record this call read and checked
    if opts.data:
        _data_step(store, opts, result, bad_packs, found, read)
    listed: dict[bytes, BadChunk] = {b.chunk_id: b for b in store.index.bad_chunks()}
    bad = {cid: b.reason for cid, b in (listed | found).items()}
    # A pack of the wrong size whose records were all read is judged record by record
    # (``found``); one not read this time stays suspect as a whole.
    suspect = {n: r for n, r in bad_packs.items() if n not in read}
    damage = check_structure(store, result, bad, suspect, report_unreferenced=False)
    _report_unreferenced(store, opts, result, bad, damage)
    if opts.progress:
        opts.progress(VerifyProgress("structure", result.snapshots, result.snapshots))
    if opts.mark:
        _mark(store, opts, result, damage, listed, bad, suspect)
    result.damaged = sorted(damage)
    result.vms = sorted({d.vm_name for d in damage.values()})
    result.seconds = time.monotonic() - started
    return result


_RESEAL: Final = "its records are intact: `tessera store repair` re-seals the pack"


def _files_step(store: "Store", opts: VerifyOptions, result: VerifyResult) -> None:
    """Findings for a missing or damaged ``index.db`` / ``catalog.db``. With the index
    replaced by a temporary copy, nothing is marked (marks belong in the real index)."""
    for name in (store.layout.index.name, store.layout.catalog.name):
        path = store.path / name
        why = store.db_problems.get(name)
        if why is None:
            damage = quick_check(path)
            why = None if damage is None else f"{name} is damaged: {damage}"
            fix = "`tessera store repair` moves it aside and rebuilds it"
        else:
            source = "packs" if name == store.layout.index.name else "manifests"
            fix = (
                f"this run used a temporary copy rebuilt from the {source}; `tessera store "
                "rebuild-index` or `repair` rebuilds it"
            )
        if why is not None:
            result.findings.append(Finding("database", str(path), f"{why}; {fix}"))
    for note in (store.index.note, store.catalog.note):
        if note is not None:
            result.warnings.append(note)
    if store.layout.index.name in store.db_problems and opts.mark:
        opts.mark = False
        result.warnings.append("nothing is marked: the index is a temporary copy")


def _data_step(
    store: "Store",
    opts: VerifyOptions,
    result: VerifyResult,
    bad_packs: dict[str, str],
    found: dict[bytes, BadChunk],
    read: set[str],
) -> None:
    packs = store.index.packs()
    sizes = {p.name: p.size for p in packs}
    result.packs_total = len(packs)
    state = VerifyState(store.path, result.warnings)
    try:
        run = state.begin(result.percent, len(packs), opts.now())
        todo, done = state.plan(run, list(sizes))
        result.run, result.resumed = run.id, run.resumed
        result.packs_in_run = done + len(todo)
        result.packs_remaining = len(todo)
        bytes_total = sum(sizes[n] for n in todo)
        bytes_done = 0
        crc_only = store.keys.data_key is None and store.config.encryption != "none"
        with ThreadPoolExecutor(opts.threads, thread_name_prefix="verify") as pool:
            for n, name in enumerate(todo):
                bad = _verify_pack(store, name, crc_only, pool, result)
                if store.index.pack_size(name) is not None:  # else GC retired it meanwhile
                    read.add(name)
                if name not in bad_packs:
                    _check_trailer(store, name, result)
                if opts.mark and bad:
                    result.marked_bad += _try_mark(store, bad, result)
                found.update((b.chunk_id, b) for b in bad)
                state.verified(run, name, opts.now(), len(bad))
                failpoints.hit("verify.pack.done")
                result.packs_checked += 1
                result.packs_remaining -= 1
                bytes_done += sizes[name]
                if opts.progress:
                    opts.progress(VerifyProgress("data", n + 1, len(todo), bytes_done, bytes_total))
        state.finish(run, opts.now())
    finally:
        state.close()


def _check_trailer(store: "Store", name: str, result: VerifyResult) -> None:
    """A finding when the pack's trailer does not describe the records the index locates
    in it (unless the cheap pack step already reported its trailer)."""
    if any(f.kind == "trailer" and f.subject == name for f in result.findings):
        return
    rows = {
        loc.offset: (bytes(cid), loc.length)
        for page in _pack_rows(store, name)
        for cid, loc in page
    }
    try:
        path = store.pack_file(name)
    except (FileNotFoundError, StoreError):  # retired by GC since; or reported missing
        return
    why = trailer_mismatch(path, name, rows)
    if why is not None and path.exists():
        result.findings.append(
            Finding("trailer", name, f"pack {name}: damaged trailer ({why}); {_RESEAL}")
        )


def _try_mark(store: "Store", bad: list[BadChunk], result: VerifyResult) -> int:
    """``Index.mark_bad``; a failed write (a full disk) is a warning: the findings stand."""
    try:
        return store.index.mark_bad(bad)
    except (sqlite3.Error, StoreError) as e:
        reason = describe(e) if isinstance(e, sqlite3.Error) else str(e)
        result.warnings.append(
            f"could not mark {len(bad)} bad chunks in {store.layout.index}: {reason}"
        )
        return 0


def _pack_rows(store: "Store", name: str) -> Iterator[list[tuple[ChunkId, Location]]]:
    after = b""
    while rows := store.index.pack_rows(name, after, _ROWS):
        after = rows[-1][0]
        yield sorted(rows, key=lambda r: r[1].offset)  # sequential reads


def _slices(rows: list[tuple[ChunkId, Location]]) -> list[list[tuple[ChunkId, Location]]]:
    """Consecutive runs of records of about ``_TASK_BYTES`` (or ``_TASK_RECORDS``): one
    thread-pool task each, so tiny records do not cost a task apiece."""
    out: list[list[tuple[ChunkId, Location]]] = [[]]
    size = 0
    for row in rows:
        if out[-1] and (size >= _TASK_BYTES or len(out[-1]) >= _TASK_RECORDS):
            out.append([])
            size = 0
        out[-1].append(row)
        size += row[1].length
    return out


def _verify_pack(
    store: "Store",
    name: str,
    crc_only: bool,
    pool: ThreadPoolExecutor,
    result: VerifyResult,
) -> list[BadChunk]:
    """Read and check every record the index locates in pack ``name``; the bad ones. A pack
    that is not its indexed size (``broken``) is still read record by record: records are
    self-describing, so a cut or grown tail costs only the records it reaches (a rebuilt
    index keeps the rest by scanning). A missing pack makes all its chunks bad."""
    since = datetime.now(UTC).isoformat(timespec="seconds")
    bad: list[BadChunk] = []
    broken: str | None = None
    try:
        fd = store.open_pack(name)
    except (FileNotFoundError, PackMissing):
        broken = f"pack {name} is missing"
        fd = -1
    except (CorruptPack, ObjectStoreError) as e:  # a bucket's copy of another size; S3
        broken = f"pack {name} is unreadable: {e}"
        fd = -1
    try:

        def check(row: tuple[ChunkId, Location]) -> str | None:
            cid, loc = row
            try:
                record = os.pread(fd, loc.length, loc.offset)
                if len(record) != loc.length:
                    raise CorruptRecord(
                        chunk=short(cid), pack=name, offset=loc.offset, reason="pack is truncated"
                    )
                if crc_only:
                    if check_crc(record, name, loc.offset).chunk_id != cid:
                        raise CorruptRecord(
                            chunk=short(cid), pack=name, offset=loc.offset, reason="id differs"
                        )
                else:
                    store.codec.decode(record, cid, name, loc.offset)
            except (IntegrityError, OSError) as e:
                return str(e)
            return None

        def check_all(rows: list[tuple[ChunkId, Location]]) -> list[str | None]:
            return [check(row) for row in rows]

        for rows in _pack_rows(store, name):
            if broken is not None:
                errors: list[str | None] = [broken] * len(rows)
            else:
                errors = [e for part in pool.map(check_all, _slices(rows)) for e in part]
            for (cid, loc), error in zip(rows, errors, strict=True):
                result.chunks_checked += 1
                result.bytes_checked += loc.length
                if error is not None:
                    bad.append(BadChunk(cid, name, loc.offset, error, since))
    finally:
        if fd >= 0:
            os.close(fd)
    return bad


def _report_unreferenced(
    store: "Store",
    opts: VerifyOptions,
    result: VerifyResult,
    bad: dict[bytes, str],
    damage: dict[str, Damage],
) -> None:
    """Bad chunks no snapshot references: reported while indexed (a future backup would
    otherwise deduplicate against them — the mark prevents it); forgotten when not indexed
    either (nothing refers to them anywhere)."""
    referenced = set().union(*(d.chunks for d in damage.values())) if damage else set()
    forget = []
    for cid, reason in sorted(bad.items()):
        if cid in referenced:
            continue
        if store.index.lookup(cid) is None:
            forget.append(cid)
        else:
            result.findings.append(Finding("bad-chunk", short(cid), reason))
    if forget and opts.mark:
        try:
            store.index.unmark_bad(forget)
        except sqlite3.Error as e:
            result.warnings.append(f"could not unmark chunks in {store.layout.index}: {e}")


def _mark(
    store: "Store",
    opts: VerifyOptions,
    result: VerifyResult,
    damage: dict[str, Damage],
    listed: dict[bytes, BadChunk],
    bad: dict[bytes, str],
    bad_packs: dict[str, str],
) -> None:
    """Persist what the structure step found: referenced chunks that are missing or in a
    broken pack join the bad list; damaged snapshots get a mark, whole ones lose theirs."""
    since = datetime.now(UTC).isoformat(timespec="seconds")
    new: list[BadChunk] = []
    for cid in sorted(set().union(*(d.chunks for d in damage.values())) if damage else ()):
        if cid in listed or cid in bad:
            continue
        loc = store.index.lookup(cid)
        if loc is None:
            new.append(BadChunk(ChunkId(cid), None, None, f"chunk {short(cid)} is missing", since))
        else:
            reason = f"chunk {short(cid)}: {bad_packs.get(loc.pack, 'unreadable')}"
            new.append(BadChunk(ChunkId(cid), loc.pack, loc.offset, reason, since))
    if new:
        result.marked_bad += _try_mark(store, new, result)
    reasons = bad | {b.chunk_id: b.reason for b in new}
    layout = store.layout
    for sid, dmg in sorted(damage.items()):
        # A writer may have healed a chunk since it was found: mark only what is still bad.
        dmg.chunks = still_bad(store.index, dmg.chunks)
        if not dmg:
            continue
        try:
            with reading_snapshot(layout, sid):
                write_damage(layout, sid, dmg, lambda c: reasons.get(c, "missing"))
        except (SnapshotNotFound, FileNotFoundError):  # pruned meanwhile
            continue
        except OSError as e:  # a full disk: the finding stands, the mark is not written
            result.warnings.append(f"could not mark snapshot {sid} damaged: {os_reason(e)}")
    for path in sorted(layout.snapshots.glob(f"*/{DAMAGED_NAME}")):
        sid = path.parent.name
        if damage.get(sid):
            continue
        try:
            with reading_snapshot(layout, sid):
                if remove_damage(layout, sid):
                    result.undamaged.append(sid)
        except SnapshotNotFound:
            continue
        except OSError as e:
            result.warnings.append(f"could not clear the mark of {sid}: {os_reason(e)}")
    for sid in [s for s, d in damage.items() if not d]:
        del damage[sid]
