"""Verify, heal and repair a store (``tessera store verify``, ``tessera store repair``).

Verify runs on a read-only open, beside a backup that holds the writer lock::

    1 packs      every indexed pack is on disk at its indexed size (cheap, always)
    2 data       (--data / --percent) the packs of this run, oldest-verified first: every
                 record located in them is read, CRC and AEAD checked and re-hashed to its id
                 (CRC and id only where the store holds no data key); a bad record's chunk
                 is marked bad in the index (``Index.mark_bad``) before the pack is recorded
                 as verified, so a killed run loses nothing it found
    3 structure  every snapshot (share-locked): manifest MAC, DiskMap checksums, and every
                 referenced chunk indexed, not bad, in a pack that is whole — streaming, with
                 only damaged ids (and the snapshots they affect) in memory
    4 marks      referenced chunks that are missing or in a broken pack are marked bad too;
                 each damaged snapshot gets ``snapshots/<id>/damaged``, and a snapshot that
                 is whole again loses its mark

Every finding is reported (never only the first), naming the pack, chunk, snapshots and VMs.

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
then removes it from the damage marks (``check.clear_healed``).

Repair (writer lock) rebuilds the index from pack trailers, moves packs whose trailer cannot
be read to ``STORE/quarantine/`` with a note (their chunks become missing), then verifies the
structure, which marks and lists what is lost.
"""

import hashlib
import json
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
    SnapshotNotFound,
    StoreError,
)
from engine.core.ids import ChunkId, short
from engine.store.check import (
    DAMAGED_NAME,
    CheckResult,
    Damage,
    Finding,
    check_structure,
    pack_problems,
    remove_damage,
    still_bad,
    write_damage,
)
from engine.store.codec import check_crc
from engine.store.index import BadChunk, Location
from engine.store.locks import reading_snapshot
from engine.store.pack import PACK_SUFFIX, pack_path, read_trailer
from engine.util import failpoints
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

STATE_DIR: Final = "verify"
QUARANTINE_DIR: Final = "quarantine"
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

    def __init__(self, root: Path):
        directory = root / STATE_DIR
        try:
            if not directory.exists():
                directory.mkdir()
                fsync_dir(root)
            self._db = sqlite3.connect(directory / "state.db", isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_STATE_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(
                path=root, reason=f"verify state {directory / 'state.db'} is not writable: {e}"
            ) from e

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
        self._db.execute("UPDATE runs SET finished = ? WHERE finished IS NULL", (now,))
        planned = min(packs, math.ceil(packs * percent / 100)) if packs else 0
        seed = secrets.token_hex(8)
        cur = self._db.execute(
            "INSERT INTO runs(started, seed, percent, planned) VALUES (?, ?, ?, ?)",
            (now, seed, percent, planned),
        )
        assert cur.lastrowid is not None
        return _Run(cur.lastrowid, seed, planned, resumed=False)

    def plan(self, run: _Run, names: list[str]) -> tuple[list[str], int]:
        """(packs still to verify in ``run``, in order; how many the run already did).
        Forgets packs no longer indexed (GC retired them)."""
        known = {
            name: (verified, r)
            for name, verified, r in self._db.execute("SELECT name, verified, run FROM packs")
        }
        gone = set(known) - set(names)
        if gone:
            self._db.executemany("DELETE FROM packs WHERE name = ?", [(n,) for n in gone])
        done = sum(1 for n in names if n in known and known[n][1] == run.id)

        def key(name: str) -> tuple[float, bytes]:
            verified = known[name][0] if name in known else -math.inf
            return verified, hashlib.blake2b((run.seed + name).encode(), digest_size=8).digest()

        todo = sorted((n for n in names if n not in known or known[n][1] != run.id), key=key)
        return todo[: max(0, run.planned - done)], done

    def verified(self, run: _Run, name: str, now: float, bad: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO packs(name, verified, run, bad) VALUES (?, ?, ?, ?)",
            (name, now, run.id, bad),
        )

    def finish(self, run: _Run, now: float) -> None:
        self._db.execute("UPDATE runs SET finished = ? WHERE id = ?", (now, run.id))

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
    bad_packs = pack_problems(store)
    for name, reason in bad_packs.items():
        result.findings.append(Finding("pack", name, reason))
    found: dict[bytes, BadChunk] = {}  # found by this call's data step
    if opts.data:
        _data_step(store, opts, result, bad_packs, found)
    listed: dict[bytes, BadChunk] = {b.chunk_id: b for b in store.index.bad_chunks()}
    bad = {cid: b.reason for cid, b in (listed | found).items()}
    damage = check_structure(store, result, bad, bad_packs, report_unreferenced=False)
    _report_unreferenced(store, opts, result, bad, damage)
    if opts.progress:
        opts.progress(VerifyProgress("structure", result.snapshots, result.snapshots))
    if opts.mark:
        _mark(store, opts, result, damage, listed, bad, bad_packs)
    result.damaged = sorted(damage)
    result.vms = sorted({d.vm_name for d in damage.values()})
    result.seconds = time.monotonic() - started
    return result


def _data_step(
    store: "Store",
    opts: VerifyOptions,
    result: VerifyResult,
    bad_packs: dict[str, str],
    found: dict[bytes, BadChunk],
) -> None:
    packs = store.index.packs()
    sizes = {p.name: p.size for p in packs}
    result.packs_total = len(packs)
    state = VerifyState(store.path)
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
                bad = _verify_pack(store, name, bad_packs.get(name), crc_only, pool, result)
                if opts.mark:
                    result.marked_bad += store.index.mark_bad(bad)
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
    broken: str | None,
    crc_only: bool,
    pool: ThreadPoolExecutor,
    result: VerifyResult,
) -> list[BadChunk]:
    """Read and check every record the index locates in pack ``name``; the bad ones. A pack
    that is missing or not its indexed size (``broken``) is not read: all its chunks are bad
    (its trailer is gone, so the chunks are lost to a rebuilt index too)."""
    since = datetime.now(UTC).isoformat(timespec="seconds")
    bad: list[BadChunk] = []
    try:
        fd = -1 if broken else os.open(pack_path(store.layout.packs, name), os.O_RDONLY)
    except FileNotFoundError:
        broken = f"pack {name} is missing"
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
        store.index.unmark_bad(forget)


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
        result.marked_bad += store.index.mark_bad(new)
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
    for sid in [s for s, d in damage.items() if not d]:
        del damage[sid]


# --- repair -----------------------------------------------------------------------------------


@dataclass
class Quarantined:
    pack: str
    reason: str
    path: str


@dataclass
class RepairResult:
    recovery: list[str] = field(default_factory=list)  # what rebuilding the index did
    quarantined: list[Quarantined] = field(default_factory=list)
    verify: VerifyResult = field(default_factory=VerifyResult)
    indexed_packs: int = 0
    indexed_chunks: int = 0

    @property
    def lost(self) -> bool:
        return bool(self.quarantined) or not self.verify.ok

    def doc(self) -> dict[str, object]:
        return {
            "recovery": self.recovery,
            "quarantined": [asdict(q) for q in self.quarantined],
            "indexed_packs": self.indexed_packs,
            "indexed_chunks": self.indexed_chunks,
            "verify": self.verify.doc(),
            "damaged": self.verify.damaged,
            "vms": self.verify.vms,
            "lost": self.lost,
        }


def repair(store: "Store", progress: Progress | None = None) -> RepairResult:
    """Rebuild the index from pack trailers, quarantine unreadable packs, then verify the
    structure (marking what is lost). Needs the store opened for writing."""
    if not store.writable:
        raise ValueError("repair needs the store opened for writing")
    result = RepairResult()
    report = store.rebuild_index()
    result.recovery = report.lines()
    indexed = {p.name for p in store.index.packs()}
    for name, path in sorted(store.layout.pack_files().items()):
        if name in indexed:
            continue
        try:
            read_trailer(path, name)
        except CorruptPack as e:
            reason = str(e)
        else:  # readable after all (indexed by a concurrent open?): leave it to recovery
            continue
        result.quarantined.append(_quarantine(store.path, name, path, reason))
    stats = store.index.stats()
    result.indexed_packs, result.indexed_chunks = stats.packs, stats.chunks
    result.verify = verify(store, VerifyOptions(progress=progress))
    return result


def _quarantine(root: Path, name: str, path: Path, reason: str) -> Quarantined:
    """Move a pack to ``STORE/quarantine/`` beside a note (written first, so a moved pack
    always has one; a crash in between leaves the pack in place for the next repair)."""
    directory = root / QUARANTINE_DIR
    if not directory.exists():
        directory.mkdir()
        fsync_dir(root)
    note = {
        "pack": name,
        "reason": reason,
        "size": path.stat().st_size,
        "quarantined": datetime.now(UTC).isoformat(timespec="seconds"),
        "from": str(path.relative_to(root)),
    }
    atomic_write(directory / f"{name}.json", json.dumps(note, indent=1).encode(), "verify.note")
    target = directory / f"{name}{PACK_SUFFIX}"
    os.rename(path, target)
    fsync_dir(directory)
    fsync_dir(path.parent)
    return Quarantined(name, reason, str(target))
