"""The Store facade: dedup, packs, snapshots, recovery on open, index rebuild, locking."""

import os
import threading
from pathlib import Path

import pytest

from engine.core.errors import (
    ChunkMissing,
    CorruptRecord,
    ManifestTampered,
    SnapshotNotFound,
    StoreError,
    StoreLocked,
)
from engine.maint.check import check_store
from engine.store.chunk_store import Store
from engine.store.pack import PackWriter, pack_path, read_trailer
from tests.conftest import CHEAP_KDF, PASSPHRASE, StoreFactory
from tests.helpers import read_disk, realistic_bytes, write_snapshot

CHUNK = 64 * 1024


def reopen(store: Store, writable: bool = True) -> Store:
    store.close()
    return Store.open(store.path, passphrase=PASSPHRASE, writable=writable)


def pack_count(store: Store) -> int:
    return len(store.layout.pack_files())


@pytest.mark.parametrize("encryption", ["aes-256-gcm", "none"])
def test_snapshot_round_trip(make_store: StoreFactory, encryption: str) -> None:
    store = make_store(encryption=encryption)
    disk = realistic_bytes(20 * CHUNK + 999, seed=1)
    m = write_snapshot(store, "vm1", {"d1": disk, "d2": bytes(3 * CHUNK)}, config=b"<ovf/>")
    store = reopen(store, writable=False)
    try:
        assert read_disk(store, store.manifest(m.snapshot_id), 0) == disk
        assert read_disk(store, store.manifest(m.snapshot_id), 1) == bytes(3 * CHUNK)
        assert m.config is not None
        assert store.read_chunk(bytes.fromhex(m.config.chunk_id)) == b"<ovf/>"  # type: ignore[arg-type]
        assert check_store(store, data=True).ok
    finally:
        store.close()


def test_put_of_known_chunk_writes_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    data = os.urandom(CHUNK)
    cid = store.codec.chunk_id(data)
    record = store.codec.encode(data, cid)
    assert store.put(cid, record) is True
    assert store.put(cid, record) is False  # pending in the open pack
    store.flush()
    size = sum(p.stat().st_size for p in store.layout.pack_files().values())
    assert store.put(cid, record) is False  # indexed
    store.flush()
    assert sum(p.stat().st_size for p in store.layout.pack_files().values()) == size
    assert store.index.stats().chunks == 1


def test_put_right_after_has_said_absent_spares_the_index_lookup(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store()
    lookups: list[bytes] = []
    has = store.index.has
    monkeypatch.setattr(store.index, "has", lambda cid: lookups.append(cid) or has(cid))
    data = [os.urandom(CHUNK) for _ in range(3)]
    ids = [store.codec.chunk_id(d) for d in data]
    records = [store.codec.encode(d, i) for d, i in zip(data, ids, strict=True)]

    assert not store.has(ids[0]) and lookups == [ids[0]]
    assert store.put(ids[0], records[0]) is True
    assert lookups == [ids[0]], "the put looked the chunk up again"
    # A put of another id than the one has() just saw absent looks it up itself.
    assert not store.has(ids[1])
    assert store.put(ids[2], records[2]) is True
    assert lookups == [ids[0], ids[1], ids[2]]


def test_put_after_has_looks_again_when_a_pack_was_indexed_between(
    make_store: StoreFactory,
) -> None:
    """has() on one thread says absent; another thread stores the same chunk and its pack is
    sealed and indexed (it leaves the open pack's pending set): the first thread's put must
    find it in the index and write nothing."""
    store = make_store()
    data = os.urandom(CHUNK)
    cid = store.codec.chunk_id(data)
    record = store.codec.encode(data, cid)
    assert not store.has(cid)

    def other_thread() -> None:
        assert store.put(cid, record) is True
        store.flush()  # sealed and indexed: no longer pending

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    assert store.put(cid, record) is False
    store.flush()
    assert store.index.stats().chunks == 1
    assert check_store(store, data=True).ok


def test_identical_vms_are_stored_once(make_store: StoreFactory) -> None:
    store = make_store()
    template = realistic_bytes(40 * CHUNK, seed=7)
    write_snapshot(store, "vm-a", {"d": template})
    after_first = store.index.stats()
    clone = bytearray(template)
    clone[5 * CHUNK : 5 * CHUNK + 100] = b"x" * 100  # one changed slot
    write_snapshot(store, "vm-b", {"d": bytes(clone)})
    after_second = store.index.stats()
    assert after_second.chunks - after_first.chunks == 1
    info = store.info()
    assert info.snapshots == 2
    assert info.dedup_ratio == pytest.approx(2 * 40 / 41, rel=0.01)
    assert info.compression_ratio > 1.5


def test_packs_seal_at_target_size_and_stay_readable(make_store: StoreFactory) -> None:
    store = make_store(pack_size=1024 * 1024)
    chunks = [os.urandom(CHUNK) for _ in range(40)]  # ~2.5 MiB incompressible
    ids = [store.put_chunk(c) for c in chunks]
    # Some are in sealed packs, the rest in the open one: all readable now.
    assert [store.read_chunk(i) for i in ids] == chunks
    store.flush()
    assert pack_count(store) >= 2
    for path in store.layout.pack_files().values():
        size, entries = read_trailer(path, path.stem)
        assert size == path.stat().st_size and entries
    assert not list((store.layout.packs / "tmp").iterdir())


def test_get_record_into_a_truncated_or_vanished_pack_names_the_chunk(
    make_store: StoreFactory,
) -> None:
    """What a restore worker meets when the disk under the store lost data: a pack cut
    short is a CorruptRecord naming the chunk and pack, a pack gone is a StoreError naming
    it; never a short record in the buffer."""
    store = make_store(pack_size=1024 * 1024)
    ids = [store.put_chunk(os.urandom(CHUNK)) for _ in range(40)]
    store.flush()
    out = memoryview(bytearray(2 * CHUNK))
    where = [store.locate(i) for i in ids]
    last = max(range(len(ids)), key=lambda i: (where[i].pack, where[i].offset))  # type: ignore[union-attr]
    loc = where[last]
    assert loc is not None
    path = pack_path(store.layout.packs, loc.pack)
    os.truncate(path, loc.offset + loc.length - 1)
    with pytest.raises(CorruptRecord, match=f"{ids[last].hex()[:16]}.*{loc.pack}.*truncated"):
        store.get_record_into(ids[last], out, loc)
    path.unlink()
    with pytest.raises(StoreError, match=f"pack {loc.pack} of chunk {ids[last].hex()[:16]}"):
        store.get_record_into(ids[last], out, loc)


def test_missing_chunk_and_snapshot_errors(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(ChunkMissing, match="abababababababab"):
        store.read_chunk(b"\xab" * 32)  # type: ignore[arg-type]
    with pytest.raises(SnapshotNotFound, match="deadbeef: no such snapshot"):
        store.resolve("deadbeef")


def test_resolve_prefix(make_store: StoreFactory) -> None:
    store = make_store()
    m = write_snapshot(store, "vm", {"d": b"a" * CHUNK})
    assert store.resolve(m.snapshot_id[:6]) == m.snapshot_id
    assert store.resolve(m.snapshot_id) == m.snapshot_id


def test_catalog_lists_by_vm_and_time(make_store: StoreFactory) -> None:
    store = make_store()
    a1 = write_snapshot(store, "alpha", {"d": b"1" * CHUNK})
    b1 = write_snapshot(store, "beta", {"d": b"2" * CHUNK})
    a2 = write_snapshot(store, "alpha", {"d": b"3" * CHUNK}, level="incremental")
    assert [e.snapshot_id for e in store.snapshots("alpha")] == [a1.snapshot_id, a2.snapshot_id]
    assert [e.vm_name for e in store.snapshots()] == ["alpha", "alpha", "beta"]
    assert store.catalog.get(b1.snapshot_id) is not None


def test_aborted_snapshot_leaves_nothing_visible(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(RuntimeError), store.begin_snapshot("vm", "vm", "full") as snap:
        dm = snap.add_disk("d", "d", CHUNK)
        dm.set(0, store.put_chunk(b"q" * CHUNK))
        raise RuntimeError("source died")
    assert store.snapshots() == []
    assert list(store.layout.snapshots.iterdir()) == []


def test_tampered_manifest_is_detected(make_store: StoreFactory) -> None:
    store = make_store()
    m = write_snapshot(store, "vm", {"d": b"z" * CHUNK})
    path = store.layout.manifest(m.snapshot_id)
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"vm_name":"vm"', b'"vm_name":"vx"'))
    with pytest.raises(ManifestTampered, match=f"{m.snapshot_id}.*MAC mismatch"):
        store.manifest(m.snapshot_id)


def test_manifest_from_another_store_key_is_refused(make_store: StoreFactory) -> None:
    a, b = make_store("a"), make_store("b")
    m = write_snapshot(a, "vm", {"d": b"z" * CHUNK})
    target = b.layout.snapshot_dir(m.snapshot_id)
    target.mkdir()
    (target / "manifest").write_bytes(a.layout.manifest(m.snapshot_id).read_bytes())
    with pytest.raises(ManifestTampered):
        b.manifest(m.snapshot_id)


def test_writer_lock(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(StoreLocked, match="opened for writing by another process"):
        Store.open(store.path, passphrase=PASSPHRASE)
    ro = Store.open(store.path, passphrase=PASSPHRASE, writable=False)
    with pytest.raises(StoreError, match="read-only"):
        ro.put_chunk(b"x" * 10)
    ro.close()


def test_recovery_drops_entries_of_missing_pack_and_reports(make_store: StoreFactory) -> None:
    store = make_store()
    disk = os.urandom(4 * CHUNK)
    m = write_snapshot(store, "vm", {"d": disk})
    (victim,) = store.layout.pack_files().values()
    store.close()
    victim.unlink()
    store = Store.open(store.path, passphrase=PASSPHRASE)
    try:
        assert any(victim.stem in p and "missing" in p for p in store.report.problems)
        assert store.index.stats().chunks == 0
        result = check_store(store)
        assert not result.ok
        assert all(m.snapshot_id in f.snapshots for f in result.findings if f.snapshots)
        # The next backup of the same data stores the chunks again and heals the old one.
        write_snapshot(store, "vm", {"d": disk})
        assert check_store(store, data=True).ok
        assert read_disk(store, store.manifest(m.snapshot_id)) == disk
    finally:
        store.close()


def test_recovery_indexes_sealed_pack_missing_from_index(make_store: StoreFactory) -> None:
    store = make_store()
    writer = PackWriter(store.layout.packs)
    data = b"orphan chunk " * 1000
    cid = store.codec.chunk_id(data)
    writer.append(cid, store.codec.encode(data, cid), len(data))
    writer.seal()  # sealed, but never added to the index (crash before index commit)
    store = reopen(store)
    try:
        assert writer.name in store.report.indexed_packs
        assert store.read_chunk(cid) == data
    finally:
        store.close()


def test_rebuild_index_from_packs(make_store: StoreFactory) -> None:
    store = make_store()
    disk = realistic_bytes(30 * CHUNK, seed=3)
    m = write_snapshot(store, "vm", {"d": disk})
    before = store.index.stats()
    store.index.clear()
    report = store.rebuild_index()
    assert not report.problems
    assert store.index.stats() == before
    assert read_disk(store, store.manifest(m.snapshot_id)) == disk


def test_index_db_deleted_is_rebuilt_on_open(make_store: StoreFactory) -> None:
    store = make_store()
    disk = realistic_bytes(10 * CHUNK, seed=4)
    m = write_snapshot(store, "vm", {"d": disk})
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.layout.index) + suffix).unlink(missing_ok=True)
    store = Store.open(store.path, passphrase=PASSPHRASE)
    try:
        assert read_disk(store, store.manifest(m.snapshot_id)) == disk
    finally:
        store.close()


def test_init_refuses_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="power of two"):
        Store.init(tmp_path / "a", chunk_size=100_000, passphrase=b"x", kdf=CHEAP_KDF)
    with pytest.raises(StoreError, match="unknown encryption"):
        Store.init(tmp_path / "a", encryption="rot13", passphrase=b"x", kdf=CHEAP_KDF)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "file").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        Store.init(tmp_path / "b", passphrase=b"x", kdf=CHEAP_KDF)
    with pytest.raises(StoreError, match="not a Tessera store"):
        Store.open(tmp_path / "b", passphrase=b"x")
