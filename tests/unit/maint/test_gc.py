"""GC on a real store: what it frees, repack, trash and its grace, leases, condemnation."""

import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from engine.core.errors import StoreLocked
from engine.core.ids import ZERO_ID
from engine.maint.check import check_store
from engine.maint.gc import GcOptions, GcResult, gc, gc_lock
from engine.maint.prune import REMOVED_DIR, prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from tests.conftest import PASSPHRASE, StoreFactory
from tests.helpers import read_disk

CHUNK = 64 * 1024
DAY = timedelta(days=1)


def chunks(n: int, seed: int) -> list[bytes]:
    """``n`` distinct incompressible chunks (records ~ chunk size: predictable packs)."""
    rng = random.Random(seed)
    return [rng.randbytes(CHUNK) for _ in range(n)]


def backup(store: Store, vm: str, data: Iterable[bytes], when: datetime) -> Manifest:
    blob = b"".join(data)
    with store.begin_snapshot(vm_id=vm, vm_name=vm, level="full", time=when) as snap:
        dm = snap.add_disk("d", "d", len(blob))
        for slot in range(len(blob) // CHUNK):
            piece = blob[slot * CHUNK : (slot + 1) * CHUNK]
            dm.set(slot, store.put_chunk(piece) if any(piece) else ZERO_ID)
        return snap.commit()


def ids_of(store: Store, manifest: Manifest) -> set[bytes]:
    out = set()
    for disk in manifest.disks:
        with store.open_diskmap(manifest, disk) as dm:
            out |= {cid for _, cid in dm.iter_ids() if cid != ZERO_ID}
    return out


def indexed(store: Store) -> set[bytes]:
    return {cid for cid, _ in store.index.iter_chunks()}


def run_gc(store: Store, now: datetime, **kw: object) -> GcResult:
    """GC at ``now``; packs sealed before a lease began count as old (no margin)."""
    kw.setdefault("young_pack_margin", timedelta(0))
    return gc(store, GcOptions(now=lambda: now, **kw))  # type: ignore[arg-type]


def two_snapshots(store: Store) -> tuple[Manifest, Manifest, list[bytes]]:
    """A (older) and B (newer) of one VM; B keeps every other chunk of A plus new ones."""
    data = chunks(40, seed=1)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    a = backup(store, "vm", data, t0)
    b = backup(store, "vm", data[::2] + chunks(4, seed=2), t0 + DAY)
    store.flush()
    return a, b, data


def test_gc_frees_exactly_the_chunks_only_pruned_snapshots_referenced(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    a, b, _ = two_snapshots(store)
    only_a = ids_of(store, a) - ids_of(store, b)
    assert len(only_a) == 20
    before = indexed(store)
    prune(store, Rules(keep_last=1))
    now = datetime.now(UTC)

    within = run_gc(store, now + DAY)  # A waits in removed/ for the grace: still marked
    assert within.removed_expired == [] and within.deleted_chunks == 0
    assert indexed(store) == before

    after = run_gc(store, now + 8 * DAY)
    assert after.removed_expired == [a.snapshot_id]
    assert not (store.path / REMOVED_DIR / a.snapshot_id).exists()
    assert after.deleted_chunks == 20 and after.condemned == 20
    assert indexed(store) == before - only_a == ids_of(store, b)
    assert check_store(store, data=True).ok
    assert read_disk(store, b) == b"".join(chunks(40, seed=1)[::2] + chunks(4, seed=2))


def test_repack_moves_live_records_and_trashes_old_packs(make_store: StoreFactory) -> None:
    store = make_store()
    _a, b, _ = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    packs_before = {p.name for p in store.index.packs()}
    now = datetime.now(UTC) + 8 * DAY
    result = run_gc(store, now, repack_threshold=0.75)
    assert result.packs_repacked + result.packs_trashed > 0
    assert result.packs_written >= 1
    packs_after = {p.name for p in store.index.packs()}
    retired = packs_before - packs_after
    assert retired and set(store.layout.trash_files()) == retired
    assert not any(name in store.layout.pack_files() for name in retired)
    for cid, loc in store.index.iter_chunks():
        assert loc.pack in packs_after
        store.read_chunk(cid)  # verifies
    assert check_store(store, data=True).ok
    assert read_disk(store, b) == b"".join(chunks(40, seed=1)[::2] + chunks(4, seed=2))
    # and after reopening (recovery finds nothing to do)
    path = store.path
    store.close()

    with Store.open(path, passphrase=PASSPHRASE) as again:
        assert again.report.lines() == []
        assert check_store(again, data=True).ok


def test_trash_is_emptied_only_after_the_grace_period(make_store: StoreFactory) -> None:
    store = make_store()
    two_snapshots(store)
    prune(store, Rules(keep_last=1))
    t = datetime.now(UTC) + 8 * DAY
    first = run_gc(store, t, repack_threshold=0.75)
    trashed = dict(store.layout.trash_files())
    assert trashed and first.trash_deleted == 0
    assert run_gc(store, t + 6 * DAY).trash_deleted == 0
    assert set(store.layout.trash_files()) == set(trashed)
    last = run_gc(store, t + 7 * DAY + timedelta(seconds=1))
    assert last.trash_deleted == len(trashed)
    assert last.trash_bytes_freed > 0
    assert store.layout.trash_files() == {}
    assert check_store(store, data=True).ok


def test_dry_run_changes_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    a, _b, _ = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    before = indexed(store)
    packs = store.layout.pack_files()
    result = run_gc(store, datetime.now(UTC) + 8 * DAY, dry_run=True, repack_threshold=0.75)
    assert result.removed_expired == [a.snapshot_id]
    assert result.unreferenced_chunks == 20  # planned as if A's expiry were done
    assert result.packs_repacked + result.packs_trashed > 0
    assert indexed(store) == before and store.layout.pack_files() == packs
    assert (store.path / REMOVED_DIR / a.snapshot_id).exists()
    assert store.layout.trash_files() == {}


def test_a_live_lease_defers_deletion_and_its_snapshot_stays_whole(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    _a, _b, data = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    now = datetime.now(UTC) + 8 * DAY
    garbage = data[1]  # referenced by A only
    with store.begin_snapshot(vm_id="vm2", vm_name="vm2", level="full") as snap:
        cid = store.codec.chunk_id(garbage)
        assert store.has(cid)  # deduplicated against a chunk GC is about to condemn
        result = run_gc(store, now)
        assert result.condemned == 20 and result.deleted_chunks == 0
        assert result.deferred_chunks == 20 and result.leases
        assert not store.has(cid)  # condemned: invisible to dedup, still readable
        assert store.read_chunk(cid) == garbage
        dm = snap.add_disk("d", "d", CHUNK)
        dm.set(0, cid)
        m = snap.commit()
    again = run_gc(store, now)  # the new snapshot marks the chunk: absolved, not deleted
    assert again.absolved == 1 and again.deleted_chunks == 19
    assert store.has(cid) and read_disk(store, m) == garbage
    assert check_store(store, data=True).ok


def test_a_condemned_chunk_put_again_is_written_and_revived(make_store: StoreFactory) -> None:
    store = make_store()
    _a, _b, data = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    now = datetime.now(UTC) + 8 * DAY
    with store.lease("test", "holds deletion back"):
        run_gc(store, now)
    cid = store.codec.chunk_id(data[1])
    old = store.index.lookup(cid)
    assert old is not None and not store.has(cid)
    m = backup(store, "vm3", [data[1]], now)
    store.flush()
    new = store.index.lookup(cid)
    assert new is not None and new.pack != old.pack and store.has(cid)
    result = run_gc(store, now)
    assert result.deleted_chunks == 19
    assert read_disk(store, m) == data[1]
    assert check_store(store, data=True).ok


def test_one_gc_at_a_time_and_writable_only(make_store: StoreFactory) -> None:
    store = make_store()
    with gc_lock(store.layout), pytest.raises(StoreLocked):
        gc(store)
    assert gc(store).deleted_chunks == 0


def test_rate_limit_sleeps_for_the_bytes_copied(make_store: StoreFactory) -> None:
    store = make_store()
    two_snapshots(store)
    prune(store, Rules(keep_last=1))
    slept: list[float] = []
    result = run_gc(
        store,
        datetime.now(UTC) + 8 * DAY,
        repack_threshold=0.75,
        rate_limit=1024 * 1024.0,
        sleep=slept.append,
    )
    assert result.bytes_copied > 0
    # 2 × bytes copied at 1 MiB/s: the sleeps cover it up to the time really spent
    assert sum(slept) > 2 * result.bytes_copied / (1024 * 1024) - result.seconds - 0.5


def test_repack_splits_sources_over_new_packs_of_bounded_records(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.maint.gc._REPACK_RECORDS", 5)  # new packs of 5 records
    store = make_store()
    _a, b, _ = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    result = run_gc(store, datetime.now(UTC) + 8 * DAY, repack_threshold=0.75)
    assert result.packs_written >= 4  # ~20 live records moved, sources split across packs
    assert all(p.records <= 5 for p in store.index.packs())  # B's own new pack holds 4
    assert check_store(store, data=True).ok
    assert read_disk(store, b) == b"".join(chunks(40, seed=1)[::2] + chunks(4, seed=2))
    assert not set(store.layout.trash_files()) & {p.name for p in store.index.packs()}


def test_a_damaged_record_keeps_its_pack_and_gc_finishes(make_store: StoreFactory) -> None:
    store = make_store()
    _a, _b, data = two_snapshots(store)
    prune(store, Rules(keep_last=1))
    bad = store.codec.chunk_id(data[0])  # kept by B, in a pack half of which is garbage
    loc = store.index.lookup(bad)
    assert loc is not None
    path = store.layout.pack_files()[loc.pack]
    with path.open("r+b") as f:  # flip a payload byte: the CRC check fails
        f.seek(loc.offset + 100)
        byte = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run_gc(store, datetime.now(UTC) + 8 * DAY, repack_threshold=0.75)
    assert any(loc.pack in n for n in result.notes)
    assert loc.pack in {p.name for p in store.index.packs()}
    assert result.packs_repacked >= 1
    findings = check_store(store, data=True).findings
    assert findings and all(f.kind == "bad-chunk" for f in findings)
