"""The receiving store's half: candidates by positional diff, and the import's refusals
(foreign keys, a missing chunk, a changed DiskMap) that leave nothing published."""

from pathlib import Path

import pytest

from engine.core.errors import ChunkMissing, CorruptDiskMap, ManifestTampered
from engine.replication import protocol as proto
from engine.replication.sender import candidate_batches
from engine.store.chunk_store import Store
from engine.store.replica import SnapshotImport
from tests.conftest import StoreFactory
from tests.helpers import read_disk, realistic_bytes, write_snapshot
from tests.unit.replication.support import init_replica

CHUNK = 64 * 1024


@pytest.fixture
def pair(make_store: StoreFactory, tmp_path: Path) -> tuple[Store, Store]:
    sender = make_store("a", chunk_size=CHUNK)
    replica = init_replica(tmp_path / "b", sender)
    yield sender, replica
    replica.close()


def copy_records(sender: Store, replica: Store, skip: int = 0) -> int:
    n = 0
    for i, (cid, _loc) in enumerate(sender.index.iter_chunks()):
        if i < skip:
            continue
        record, _, _ = sender.get_record(cid)
        replica.put(cid, record)
        n += 1
    return n


def stage(sender: Store, imp: SnapshotImport, snapshot_id: str) -> bytes:
    manifest = sender.manifest(snapshot_id)
    for disk in manifest.disks:
        imp.stage_diskmap(
            disk.diskmap, (sender.layout.snapshot_dir(snapshot_id) / disk.diskmap).read_bytes()
        )
    return sender.layout.manifest(snapshot_id).read_bytes()


def test_positional_diff_offers_changed_slots_once(pair: tuple[Store, Store]) -> None:
    sender, _ = pair
    a = realistic_bytes(8 * CHUNK, seed=1)
    m1 = write_snapshot(sender, "vm", {"d": a + a[:CHUNK]}, config=b"cfg")
    b = bytearray(a + a[:CHUNK])
    b[2 * CHUNK : 3 * CHUNK] = realistic_bytes(CHUNK, seed=2)
    b[5 * CHUNK : 6 * CHUNK] = bytes(CHUNK)
    m2 = write_snapshot(sender, "vm", {"d": bytes(b)}, config=b"cfg")
    full = [cid for batch in candidate_batches(sender, m1, None, size=3) for cid in batch]
    assert len(full) == 9  # config + 8 distinct chunks (the last slot repeats the first)
    assert all(len(batch) <= 3 for batch in candidate_batches(sender, m1, None, size=3))
    diff = [cid for batch in candidate_batches(sender, m2, m1) for cid in batch]
    assert diff == [sender.codec.chunk_id(bytes(b[2 * CHUNK : 3 * CHUNK]))]


def test_import_publishes_in_commit_order(pair: tuple[Store, Store]) -> None:
    sender, replica = pair
    data = realistic_bytes(6 * CHUNK + 100, seed=3)
    m = write_snapshot(sender, "vm", {"d": data}, config=b"cfg")
    copy_records(sender, replica)
    imp = SnapshotImport(replica, m.snapshot_id)
    raw = stage(sender, imp, m.snapshot_id)
    assert not replica.snapshots()
    manifest = imp.commit(raw)
    assert read_disk(replica, manifest) == data
    assert [e.snapshot_id for e in replica.snapshots()] == [m.snapshot_id]
    assert imp.commit(raw) == manifest  # idempotent


def test_import_refuses_a_missing_chunk(pair: tuple[Store, Store]) -> None:
    sender, replica = pair
    m = write_snapshot(sender, "vm", {"d": realistic_bytes(6 * CHUNK, seed=4)})
    copy_records(sender, replica, skip=1)
    imp = SnapshotImport(replica, m.snapshot_id)
    raw = stage(sender, imp, m.snapshot_id)
    with pytest.raises(ChunkMissing, match="references 1 missing chunks"):
        imp.commit(raw)
    assert not replica.layout.manifest(m.snapshot_id).exists()
    imp.abort()
    assert not imp.dir.exists()


def test_import_refuses_foreign_keys_and_changed_diskmaps(
    pair: tuple[Store, Store], make_store: StoreFactory
) -> None:
    sender, replica = pair
    stranger = make_store("c", chunk_size=CHUNK)
    assert proto.key_fingerprint(stranger.keys) != proto.key_fingerprint(replica.keys)
    assert proto.key_fingerprint(sender.keys) == proto.key_fingerprint(replica.keys)
    m = write_snapshot(stranger, "vm", {"d": realistic_bytes(2 * CHUNK, seed=5)})
    imp = SnapshotImport(replica, m.snapshot_id)
    with pytest.raises(ManifestTampered, match="MAC mismatch"):
        imp.commit(stage(stranger, imp, m.snapshot_id))

    m2 = write_snapshot(sender, "vm", {"d": realistic_bytes(2 * CHUNK, seed=6)})
    copy_records(sender, replica)
    imp2 = SnapshotImport(replica, m2.snapshot_id)
    raw = stage(sender, imp2, m2.snapshot_id)
    disk = m2.disks[0]
    damaged = bytearray((sender.layout.snapshot_dir(m2.snapshot_id) / disk.diskmap).read_bytes())
    damaged[-1] ^= 1
    imp2.stage_diskmap(disk.diskmap, bytes(damaged))
    with pytest.raises(CorruptDiskMap):
        imp2.commit(raw)
    assert not replica.layout.manifest(m2.snapshot_id).exists()
