"""Prune, protect and undo on a real store: what moves where, crash windows, locking."""

import json
import os
from datetime import UTC, datetime, timedelta

import pytest

from engine.core.errors import SnapshotNotFound
from engine.core.ids import ZERO_ID
from engine.maint.check import check_store
from engine.maint.prune import (
    PROTECTED_NAME,
    REMOVAL_RECORD,
    REMOVED_DIR,
    PruneLocked,
    is_protected,
    prune,
    prune_lock,
    removed_snapshots,
    set_protected,
    unremove,
)
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.locks import reading_snapshot
from engine.store.manifest import Manifest
from engine.util import failpoints
from tests.conftest import PASSPHRASE, StoreFactory
from tests.helpers import realistic_bytes

T0 = datetime(2026, 11, 1, 10, 0, tzinfo=UTC)
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def backup(store: Store, vm: str, when: datetime, data: bytes, level: str = "full") -> Manifest:
    size = store.config.chunk_size
    with store.begin_snapshot(vm_id=vm, vm_name=vm, level=level, time=when) as snap:
        dm = snap.add_disk("d", "d", len(data))
        for slot, start in enumerate(range(0, len(data), size)):
            chunk = data[start : start + size]
            dm.set(slot, ZERO_ID if not any(chunk) else store.put_chunk(chunk))
        return snap.commit()


def daily(store: Store, vm: str, days: int) -> list[str]:
    data = realistic_bytes(4 * store.config.chunk_size, seed=len(vm))
    return [backup(store, vm, T0 + timedelta(days=i), data).snapshot_id for i in range(days)]


def reopen_ro(store: Store) -> Store:
    store.close()
    return Store.open(store.path, passphrase=PASSPHRASE, writable=False)


def test_prune_moves_manifests_to_removed_and_keeps_chunks(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 5)
    chunks_before = store.index.stats().chunks
    result = prune(store, Rules(keep_last=2), now=NOW, tz=UTC)
    assert sorted(result.removed) == sorted(ids[:3])
    assert [e.snapshot_id for e in store.snapshots()] == ids[3:]
    assert store.layout.committed_snapshots() == set(ids[3:])
    assert store.index.stats().chunks == chunks_before  # GC's job, not prune's
    removed = removed_snapshots(store.layout)
    assert sorted(r.snapshot_id for r in removed) == sorted(ids[:3])
    record = json.loads((store.path / REMOVED_DIR / ids[0] / REMOVAL_RECORD).read_bytes())
    assert record["vm_name"] == "vm1" and record["reasons"] == ["no rule keeps it"]
    assert record["rules"] == "keep-last 2"
    assert all(r.removed_at is not None for r in removed)
    assert check_store(store).ok
    with pytest.raises(SnapshotNotFound):
        store.manifest(ids[0])
    # idempotent: nothing more to remove
    again = prune(store, Rules(keep_last=2), now=NOW, tz=UTC)
    assert again.removed == [] and all(d.keep for d in again.decisions)


def test_dry_run_changes_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 4)
    result = prune(store, Rules(keep_last=1), now=NOW, tz=UTC, dry_run=True)
    assert {d.snapshot_id for d in result.to_remove} == set(ids[:3])
    assert result.removed == []
    assert len(store.snapshots()) == 4
    assert not (store.path / REMOVED_DIR).exists()


def test_empty_rules_are_refused(make_store: StoreFactory) -> None:
    store = make_store()
    daily(store, "vm1", 2)
    with pytest.raises(ValueError, match="no keep rules"):
        prune(store, Rules(), now=NOW)
    with pytest.raises(ValueError, match="no keep rules"):
        prune(store, Rules(keep_daily=0), now=NOW)


def test_protected_snapshots_survive_and_unprotect(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 4)
    assert set_protected(store, ids[0][:6], True) is True  # a unique prefix works
    assert set_protected(store, ids[0], True) is False
    assert is_protected(store.layout, ids[0])
    result = prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
    assert sorted(result.removed) == sorted(ids[1:3])
    assert {e.snapshot_id for e in store.snapshots()} == {ids[0], ids[3]}
    assert set_protected(store, ids[0], False) is True
    assert not (store.layout.snapshot_dir(ids[0]) / PROTECTED_NAME).exists()
    assert prune(store, Rules(keep_last=1), now=NOW, tz=UTC).removed == [ids[0]]


def test_protect_a_missing_snapshot_names_it(make_store: StoreFactory) -> None:
    store = make_store()
    daily(store, "vm1", 1)
    with pytest.raises(SnapshotNotFound, match="snapshot nope"):
        set_protected(store, "nope", True)


def test_prune_on_a_read_only_store_while_a_writer_holds_the_lock(
    make_store: StoreFactory,
) -> None:
    writer = make_store()
    ids = daily(writer, "vm1", 3)
    reader = Store.open(writer.path, passphrase=PASSPHRASE, writable=False)
    try:
        result = prune(reader, Rules(keep_last=1), now=NOW, tz=UTC)
        assert sorted(result.removed) == sorted(ids[:2])
        set_protected(reader, ids[2], True)
    finally:
        reader.close()
    # the writer (a running backup) keeps working and sees the change
    assert [e.snapshot_id for e in writer.snapshots()] == [ids[2]]
    new = backup(writer, "vm1", T0 + timedelta(days=10), b"x" * 1000)
    assert {e.snapshot_id for e in writer.snapshots()} == {ids[2], new.snapshot_id}


def test_only_one_prune_at_a_time(make_store: StoreFactory) -> None:
    store = make_store()
    daily(store, "vm1", 2)
    with prune_lock(store.layout):
        with pytest.raises(PruneLocked, match=f"a prune is running \\(pid {os.getpid()}\\)"):
            prune(store, Rules(keep_last=1), now=NOW)
        with pytest.raises(PruneLocked, match="cannot protect"):
            set_protected(store, store.snapshots()[0].snapshot_id, True)


def test_vm_filter_and_per_vm_newest(make_store: StoreFactory) -> None:
    store = make_store()
    a = daily(store, "vm-a", 3)
    b = daily(store, "vm-b", 3)
    result = prune(store, Rules(keep_last=1), vm="vm-a", now=NOW, tz=UTC)
    assert sorted(result.removed) == sorted(a[:2])
    assert {e.snapshot_id for e in store.snapshots("vm-b")} == set(b)


def test_crash_before_the_rename_rolls_back(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 3)

    def crash(name: str) -> None:
        if name == "maint.removal.after_rename":
            raise KeyboardInterrupt  # stands in for a kill after step 2

    failpoints.install(crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
    finally:
        failpoints.install(None)
    assert store.layout.committed_snapshots() == set(ids)  # nothing was removed
    stale = list(store.layout.snapshots.glob(f"*/{REMOVAL_RECORD}"))
    assert len(stale) == 1 and stale[0].parent.name in ids[:2]
    # a read-only reopen still serves it; the next prune rolls back, reconciles, finishes
    store = reopen_ro(store)
    try:
        result = prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
    finally:
        store.close()
    assert any("rolled back" in n for n in result.notes)
    assert sorted(result.removed) == sorted(ids[:2])
    store = Store.open(store.path, passphrase=PASSPHRASE)
    try:
        assert [e.snapshot_id for e in store.snapshots()] == [ids[2]]
        assert store.report.catalog_added == 0 and store.report.catalog_removed == 0
    finally:
        store.close()


def test_writable_open_reconciles_a_prune_killed_after_the_rename(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    ids = daily(store, "vm1", 2)
    path = store.path
    store.close()
    # simulate: rename done, catalog update lost (the catalog still lists the snapshot)
    (path / REMOVED_DIR).mkdir()
    os.rename(path / "snapshots" / ids[0], path / REMOVED_DIR / ids[0])
    store = Store.open(path, passphrase=PASSPHRASE)
    try:
        assert [e.snapshot_id for e in store.snapshots()] == [ids[1]]
        assert store.report.catalog_removed == 1
    finally:
        store.close()


def test_unremove_within_the_grace_period(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 3)
    prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
    unremove(store, ids[0])
    assert {e.snapshot_id for e in store.snapshots()} == {ids[0], ids[2]}
    assert not (store.layout.snapshot_dir(ids[0]) / REMOVAL_RECORD).exists()
    assert check_store(store).ok
    with pytest.raises(SnapshotNotFound, match="not among removed"):
        unremove(store, ids[0])


def test_removed_dir_survives_recovery(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 2)
    prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
    store.close()
    store = Store.open(store.path, passphrase=PASSPHRASE)
    try:
        assert [r.snapshot_id for r in removed_snapshots(store.layout)] == [ids[0]]
        assert store.report.lines() == []
    finally:
        store.close()


def test_a_snapshot_being_read_is_skipped_until_the_reader_ends(make_store: StoreFactory) -> None:
    store = make_store()
    ids = daily(store, "vm1", 3)
    with reading_snapshot(store.layout, ids[0]):  # what a restore or verify holds
        result = prune(store, Rules(keep_last=1), now=NOW, tz=UTC)
        assert result.removed == [ids[1]]
        assert result.skipped == {ids[0]: "in use by a restore or verify"}
    assert prune(store, Rules(keep_last=1), now=NOW, tz=UTC).removed == [ids[0]]
    with pytest.raises(SnapshotNotFound), reading_snapshot(store.layout, ids[0]):
        pass
