"""The store contract: every implementation runs these tests through the ``harness`` fixture.

The seam is ``engine.store.protocols``: ``ChunkReader`` (restores, the replication sender,
standby), ``ChunkWriter`` (the backup pipeline) and ``BackupStore`` (the backup job), with
the ``SnapshotWriter`` that ``begin_snapshot`` hands out. What their users rely on, from the
protocols' and ``Store``'s docstrings:

- Chunks. A put record reads back as it was put (``get_record``) and its chunk as the
  plaintext it was made from (``read_chunk``), at once; ``has`` is true from the put on, so
  a second put of the chunk writes nothing and says so (False), whatever its encoding. Once
  a snapshot naming a chunk committed, ``locate`` says where its record is (the pack and
  offset ``get_record`` gives, its length, its plaintext length: the restore planner checks
  that against the slot). A record that is not the chunk's is refused. A chunk never put is
  absent everywhere, and reading it raises ``ChunkMissing`` naming it; a damaged record
  raises an integrity error naming the chunk and is never returned as plaintext; the ZERO
  id is never read. Concurrent puts of one chunk write it once (consumers put from threads).
- Bad chunks (``bad_chunk_ids``: verify found them damaged, or referenced and missing) are
  not ``has``: the next put stores them again, and once a snapshot naming them commits they
  are healed (no longer bad, ``has`` again, readable).
- Snapshots. Nothing of a snapshot is visible until ``commit`` returns (not in
  ``snapshots``, not ``resolve``d, no ``manifest``, ``reading_snapshot`` refuses it); then
  all of it is: its catalog entry (VM, level, parent, disk count, size, data bytes), its
  manifest (disks, attributes, config, consistency, tags, time), its DiskMaps (one id per
  slot, ZERO for zero slots) and every chunk they name. A snapshot left by an exception or
  whose commit failed leaves nothing behind (no directory, no lease) but the chunks it put
  (GC's to take); a writer commits once.
- The catalog lists snapshots by VM name and time; by VM (its id or its name) in time
  order, so the last one is the VM's newest. ``resolve`` takes a full id or a unique prefix
  and raises ``SnapshotNotFound`` saying "ambiguous" or "no such snapshot" (there is no
  "latest": callers take the last of ``snapshots(vm)``).
- A manifest that changed where it is kept raises ``ManifestTampered``; a DiskMap whose ids
  changed raises ``CorruptDiskMap`` when opened through its manifest.
- Finally the backup job and the restore job, the protocols' main users, back a VM up into
  the store (full, then incremental) and restore both snapshots byte for byte.

Where implementations differ on purpose (``tests.memory_store``): the in-memory store
locates a chunk as soon as it is put and heals a bad one at its put; ``Store`` does both
when the pack is sealed (at the latest, at the commit). The suite checks them only after a
commit. Implementations (``stores.STORES``): ``Store`` with AES-GCM and with plaintext
records, ``MemoryStore``.
"""

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.core.errors import (
    ChunkMissing,
    CorruptDiskMap,
    CorruptRecord,
    IntegrityError,
    ManifestTampered,
    SnapshotNotFound,
)
from engine.core.ids import ZERO_ID, ChunkId, short
from engine.jobs.backup import run_backup
from engine.jobs.journal import Journal
from engine.jobs.restore import run_restore
from engine.jobs.states import State
from engine.store import format as fmt
from engine.store.index import Location
from engine.store.manifest import Manifest
from engine.store.protocols import BackupStore, ChunkReader, ChunkWriter
from engine.workers import ThreadCpuPool
from tests.contract.stores import CHUNK, STORES, StoreHarness
from tests.helpers import realistic_bytes
from tests.memory import MemoryDisk, MemorySource, MemoryTargets, MemoryVm


class Refused(Exception):
    """What a test raises inside a snapshot writer's context."""


@pytest.fixture(params=list(STORES))
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHarness]:
    with STORES[request.param](tmp_path, request) as h:
        yield h


def put(store: ChunkWriter, plain: bytes) -> tuple[ChunkId, bool]:
    """Hash, encode and put as the backup pipeline does; (id, written)."""
    cid = store.codec.chunk_id(plain)
    return cid, store.put(cid, store.codec.encode(plain, cid))


def commit(
    store: BackupStore,
    vm: str,
    disks: dict[str, bytes],
    *,
    config: bytes | None = None,
    level: str = "full",
    parent: str | None = None,
    time: datetime | None = None,
) -> Manifest:
    """A snapshot of ``disks`` (disk id → bytes), slot by slot, committed."""
    with store.begin_snapshot(f"id-{vm}", vm, level, parent, time) as snap:
        if config is not None:
            snap.set_config("json", config)
        for disk_id, data in disks.items():
            dm = snap.add_disk(disk_id, f"{vm}_{disk_id}", len(data), {"format": "raw"})
            for slot, start in enumerate(range(0, len(data), CHUNK)):
                piece = data[start : start + CHUNK]
                dm.set(slot, ZERO_ID if not any(piece) else put(store, piece)[0])
        return snap.commit(consistency="crash", tags={"checkpoint": "c-1"})


def read_back(store: ChunkReader, manifest: Manifest, index: int) -> bytes:
    disk = manifest.disks[index]
    out = bytearray()
    with store.open_diskmap(manifest, disk) as dm:
        for slot, cid in dm.iter_ids():
            length = min(dm.chunk_size, disk.size - slot * dm.chunk_size)
            out += bytes(length) if cid == ZERO_ID else store.read_chunk(cid)
    return bytes(out)


def invisible(store: ChunkReader, snapshot_id: str) -> None:
    assert snapshot_id not in [e.snapshot_id for e in store.snapshots()]
    with pytest.raises(SnapshotNotFound):
        store.resolve(snapshot_id)
    with pytest.raises(SnapshotNotFound):
        store.manifest(snapshot_id)
    with pytest.raises(SnapshotNotFound), store.reading_snapshot(snapshot_id):
        pass


# --- chunks ----------------------------------------------------------------------------------

PAYLOADS = {
    "compressible": realistic_bytes(CHUNK, seed=1),
    "incompressible": os.urandom(CHUNK),
    "short": os.urandom(1000),
    "one-byte": b"\x01",
}


def test_put_chunks_read_back_as_put(harness: StoreHarness) -> None:
    store = harness.store
    put_records = {}
    with store.begin_snapshot("id-vm", "vm", "full") as snap:
        dm = snap.add_disk("d", "vm_d", len(PAYLOADS) * CHUNK)
        for slot, (name, plain) in enumerate(PAYLOADS.items()):
            cid = store.codec.chunk_id(plain)
            assert not store.has(cid), name
            record = bytes(store.codec.encode(plain, cid))
            assert store.put(cid, record) is True, name
            assert store.has(cid), name
            assert store.get_record(cid)[0] == record, name
            assert got_into(store, cid) == store.get_record(cid), name  # not yet sealed
            assert store.read_chunk(cid) == plain, name
            put_records[cid] = (record, plain)
            dm.set(slot, cid)
        snap.commit()
    for cid, (record, plain) in put_records.items():
        got, pack, offset = store.get_record(cid)
        assert got == record
        loc = store.locate(cid)
        assert loc is not None, "a committed snapshot's chunks are located"
        assert (loc.pack, loc.offset, loc.length, loc.plain_len) == (
            pack,
            offset,
            len(record),
            len(plain),
        )
        assert store.read_chunk(cid) == plain
        assert got_into(store, cid) == (record, pack, offset)
        assert got_into(store, cid, loc) == (record, pack, offset)  # where the planner found
        with pytest.raises(ValueError, match="does not fit"):
            store.get_record_into(cid, memoryview(bytearray(len(record) - 1)))


def got_into(
    store: ChunkReader, cid: bytes, where: Location | None = None
) -> tuple[bytes, str, int]:
    """``get_record_into`` a buffer larger than the record, as ``get_record`` returns."""
    out = bytearray(fmt.max_record_size(CHUNK) + 100)
    n, pack, offset = store.get_record_into(cid, memoryview(out), where)
    return bytes(out[:n]), pack, offset


def test_put_of_a_stored_chunk_writes_nothing(harness: StoreHarness) -> None:
    store = harness.store
    plain = PAYLOADS["compressible"]
    cid, written = put(store, plain)
    assert written
    first = store.get_record(cid)[0]
    # Another encoding of the same chunk (encryption draws a new nonce): still nothing.
    again = bytes(store.codec.encode(plain, cid))
    assert store.put(cid, again) is False
    assert put(store, plain) == (cid, False)
    assert store.get_record(cid)[0] == first
    assert store.read_chunk(cid) == plain


def test_a_record_that_is_not_the_chunks_is_refused(harness: StoreHarness) -> None:
    store = harness.store
    a, b = os.urandom(5000), os.urandom(5000)
    cid_a, cid_b = store.codec.chunk_id(a), store.codec.chunk_id(b)
    record_a = bytes(store.codec.encode(a, cid_a))
    with pytest.raises(CorruptRecord, match=short(cid_b)):
        store.put(cid_b, record_a)
    with pytest.raises(CorruptRecord):
        store.put(cid_a, record_a[:-1])  # shorter than its header says
    assert not store.has(cid_a)
    assert not store.has(cid_b)


def test_a_chunk_never_put_is_missing_by_name(harness: StoreHarness) -> None:
    store = harness.store
    cid = store.codec.chunk_id(b"never put")
    assert not store.has(cid)
    assert store.locate(cid) is None
    with pytest.raises(ChunkMissing, match=short(cid)):
        store.get_record(cid)
    with pytest.raises(ChunkMissing, match=short(cid)):
        store.get_record_into(cid, memoryview(bytearray(CHUNK)))
    with pytest.raises(ChunkMissing, match=short(cid)):
        store.read_chunk(cid)
    assert cid not in store.bad_chunk_ids()


def test_the_zero_id_is_never_read(harness: StoreHarness) -> None:
    with pytest.raises(ValueError, match="ZERO"):
        harness.store.read_chunk(ZERO_ID)


def test_a_damaged_record_is_refused_never_returned(harness: StoreHarness) -> None:
    store = harness.store
    data = realistic_bytes(2 * CHUNK, seed=2)
    manifest = commit(store, "vm", {"d": data})
    cid = store.codec.chunk_id(data[:CHUNK])
    harness.damage(cid)
    with pytest.raises(IntegrityError, match=short(cid)):
        store.read_chunk(cid)
    with pytest.raises(IntegrityError, match=short(cid)):
        read_back(store, manifest, 0)
    other = store.codec.chunk_id(data[CHUNK:])
    assert store.read_chunk(other) == data[CHUNK:]  # the other chunk is intact


def test_concurrent_puts_of_one_chunk_write_it_once(harness: StoreHarness) -> None:
    store = harness.store
    plain = PAYLOADS["incompressible"]
    cid = store.codec.chunk_id(plain)
    records = [bytes(store.codec.encode(plain, cid)) for _ in range(8)]
    start = threading.Barrier(len(records))

    def put_one(record: bytes) -> bool:
        start.wait()
        return store.put(cid, record)

    with ThreadPoolExecutor(len(records)) as threads:
        written = list(threads.map(put_one, records))
    assert written.count(True) == 1
    assert store.get_record(cid)[0] == records[written.index(True)]
    assert store.read_chunk(cid) == plain


@pytest.mark.parametrize("missing", [False, True], ids=["damaged", "missing"])
def test_a_bad_chunk_is_stored_again_and_healed(harness: StoreHarness, missing: bool) -> None:
    store = harness.store
    data = realistic_bytes(3 * CHUNK, seed=3)
    bad_plain = data[CHUNK : 2 * CHUNK]
    cid = store.codec.chunk_id(bad_plain)
    if missing:  # referenced by a snapshot, never stored
        harness.mark_bad(cid, missing=True)
    else:
        commit(store, "vm", {"d": data})
        harness.mark_bad(cid, missing=False)
    assert store.bad_chunk_ids() == {cid}
    assert not store.has(cid), "a bad chunk does not deduplicate"
    assert put(store, bad_plain) == (cid, True), "a put stores it again"
    again = commit(store, "vm", {"d": data}, level="incremental")
    assert store.bad_chunk_ids() == set(), "the put healed it"
    assert store.has(cid)
    assert store.read_chunk(cid) == bad_plain
    assert read_back(store, again, 0) == data


# --- snapshots -------------------------------------------------------------------------------


def test_a_snapshot_is_invisible_until_it_commits_then_whole(harness: StoreHarness) -> None:
    store = harness.store
    os_disk = realistic_bytes(5 * CHUNK, seed=4) + bytes(3 * CHUNK) + os.urandom(4608)
    blank = bytes(2 * CHUNK)
    config = b'{"name": "web", "memory": 2048}'
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    before = commit(store, "web", {"os": os_disk[: 2 * CHUNK]}, time=at - timedelta(days=1))
    with store.begin_snapshot("id-web", "web", "incremental", before.snapshot_id, at) as snap:
        snapshot_id = snap.snapshot_id
        snap.set_config("json", config)
        os_map = snap.add_disk("os", "web_os", len(os_disk), {"format": "cow"})
        for slot, start in enumerate(range(0, len(os_disk), CHUNK)):
            piece = os_disk[start : start + CHUNK]
            os_map.set(slot, ZERO_ID if not any(piece) else put(store, piece)[0])
        blank_map = snap.add_disk("blank", "web_blank", len(blank))
        blank_map.set_zero(0, 2)
        snap.annotate(blank_map, {"fallback": "full read"})
        invisible(store, snapshot_id)
        manifest = snap.commit(consistency="application", tags={"checkpoint": "c-2"})
    assert manifest.snapshot_id == snapshot_id

    (entry,) = [e for e in store.snapshots() if e.snapshot_id == snapshot_id]
    assert (entry.vm_id, entry.vm_name, entry.level, entry.parent) == (
        "id-web",
        "web",
        "incremental",
        before.snapshot_id,
    )
    assert (entry.disks, entry.size) == (2, len(os_disk) + len(blank))
    assert entry.data_bytes == len(os_disk) - 3 * CHUNK  # zero slots hold no data
    assert store.resolve(snapshot_id) == snapshot_id
    assert store.manifest(snapshot_id) == manifest
    assert datetime.fromisoformat(manifest.time) == at
    assert (manifest.level, manifest.parent, manifest.consistency) == (
        "incremental",
        before.snapshot_id,
        "application",
    )
    assert manifest.tags == {"checkpoint": "c-2"}
    assert manifest.chunk_size == CHUNK
    assert [(d.disk_id, d.name, d.size) for d in manifest.disks] == [
        ("os", "web_os", len(os_disk)),
        ("blank", "web_blank", len(blank)),
    ]
    assert manifest.disks[0].attributes == {"format": "cow"}
    assert manifest.disks[1].attributes == {"fallback": "full read"}
    assert manifest.config is not None
    assert (manifest.config.format, manifest.config.size) == ("json", len(config))
    assert store.read_chunk(ChunkId(bytes.fromhex(manifest.config.chunk_id))) == config
    with store.reading_snapshot(snapshot_id), store.reading_snapshot(snapshot_id):
        assert read_back(store, manifest, 0) == os_disk
        assert read_back(store, manifest, 1) == blank
        with store.open_diskmap(manifest, manifest.disks[0]) as dm:
            zero = [slot for slot, cid in dm.iter_ids() if cid == ZERO_ID]
        assert zero == [5, 6, 7]
    assert harness.leftovers() == []


def test_a_snapshot_left_by_an_exception_leaves_nothing_but_its_chunks(
    harness: StoreHarness,
) -> None:
    store = harness.store
    data = realistic_bytes(2 * CHUNK, seed=5)
    with pytest.raises(Refused), store.begin_snapshot("id-vm", "vm", "full") as snap:
        snapshot_id = snap.snapshot_id
        snap.set_config("json", b"{}")
        dm = snap.add_disk("d", "vm_d", len(data))
        dm.set(0, put(store, data[:CHUNK])[0])
        dm.set(1, put(store, data[CHUNK:])[0])
        raise Refused
    invisible(store, snapshot_id)
    assert store.snapshots() == []
    assert harness.leftovers() == []
    # Chunks stay (GC takes them): the next backup finds them stored.
    assert put(store, data[:CHUNK])[1] is False
    assert read_back(store, commit(store, "vm", {"d": data}), 0) == data


def test_a_snapshot_whose_commit_fails_leaves_nothing(harness: StoreHarness) -> None:
    store = harness.store
    snap = store.begin_snapshot("id-vm", "vm", "full")
    dm = snap.add_disk("d", "vm_d", 3 * CHUNK)
    dm.set(0, put(store, os.urandom(CHUNK))[0])
    dm.set_zero(2, 1)  # slot 1 is never set: a bug the commit must not publish
    with pytest.raises(ValueError, match="never set"):
        snap.commit()
    invisible(store, snap.snapshot_id)
    assert harness.leftovers() == []
    with pytest.raises(RuntimeError):
        snap.commit()


def test_a_snapshot_commits_once(harness: StoreHarness) -> None:
    store = harness.store
    with store.begin_snapshot("id-vm", "vm", "full") as snap:
        manifest = snap.commit()
        with pytest.raises(RuntimeError, match="already committed"):
            snap.commit()
    assert store.manifest(manifest.snapshot_id) == manifest  # leaving the context kept it
    assert [e.snapshot_id for e in store.snapshots()] == [manifest.snapshot_id]


def test_catalog_lists_by_vm_name_and_time(harness: StoreHarness) -> None:
    store = harness.store
    day = datetime(2026, 3, 1, tzinfo=UTC)
    made: dict[str, list[tuple[datetime, str]]] = {"web": [], "db": [], "app": []}
    # Committed out of time order, VMs interleaved.
    for vm, days in (("web", 3), ("db", 1), ("app", 2), ("web", 1), ("db", 2), ("web", 2)):
        m = commit(store, vm, {}, time=day + timedelta(days=days))
        made[vm].append((day + timedelta(days=days), m.snapshot_id))
    by_time = {vm: [sid for _, sid in sorted(snaps)] for vm, snaps in made.items()}
    assert [e.snapshot_id for e in store.snapshots()] == (
        by_time["app"] + by_time["db"] + by_time["web"]
    )
    for vm, ids in by_time.items():
        assert [e.snapshot_id for e in store.snapshots(vm)] == ids
        assert [e.snapshot_id for e in store.snapshots(f"id-{vm}")] == ids
        assert {e.vm_name for e in store.snapshots(vm)} == {vm}
    assert store.snapshots("nobody") == []


def test_resolve_takes_an_id_or_a_unique_prefix(harness: StoreHarness) -> None:
    store = harness.store
    # 17 snapshots: two of them share a first hex digit at least, whatever their ids.
    ids = [commit(store, "vm", {}).snapshot_id for _ in range(17)]
    for sid in ids:
        assert store.resolve(sid) == sid
        unique = next(
            sid[:n] for n in range(1, len(sid) + 1) if sum(o.startswith(sid[:n]) for o in ids) == 1
        )
        assert store.resolve(unique) == sid
    shared = next(sid[0] for sid in ids if sum(o.startswith(sid[0]) for o in ids) > 1)
    with pytest.raises(SnapshotNotFound, match="ambiguous"):
        store.resolve(shared)
    for ref in ("latest", "g", ids[0] + "0", "%", "_"):
        with pytest.raises(SnapshotNotFound, match="no such snapshot"):
            store.resolve(ref)


def test_an_empty_reference_is_refused_even_with_one_snapshot(harness: StoreHarness) -> None:
    store = harness.store
    commit(store, "vm", {})
    with pytest.raises(SnapshotNotFound, match="empty"):
        store.resolve("")


def test_a_tampered_manifest_is_refused(harness: StoreHarness) -> None:
    store = harness.store
    manifest = commit(store, "vm", {"d": os.urandom(CHUNK)})
    harness.tamper_manifest(manifest.snapshot_id)
    with pytest.raises(ManifestTampered, match=manifest.snapshot_id):
        store.manifest(manifest.snapshot_id)


def test_a_changed_diskmap_is_refused(harness: StoreHarness) -> None:
    store = harness.store
    data = os.urandom(CHUNK) + bytes(CHUNK)
    manifest = commit(store, "vm", {"d": data})
    disk = manifest.disks[0]
    path = harness.diskmap_file(manifest, disk)
    raw = bytearray(path.read_bytes())
    # slot 1 (ZERO) now names slot 0's chunk: a well-formed map, not the committed one
    slot0 = fmt.DISKMAP_HEADER_SIZE
    raw[slot0 + 32 : slot0 + 64] = raw[slot0 : slot0 + 32]
    path.write_bytes(raw)
    with pytest.raises(CorruptDiskMap):
        store.open_diskmap(manifest, disk)


# --- the jobs that use the protocols ---------------------------------------------------------


async def test_backup_and_restore_jobs_through_the_store(
    harness: StoreHarness, tmp_path: Path
) -> None:
    store = harness.store
    os_data = bytearray(realistic_bytes(12 * CHUNK + 5000, seed=6))
    os_data[4 * CHUNK : 8 * CHUNK] = bytes(4 * CHUNK)
    vm = MemoryVm(
        "vm-contract",
        "contract",
        [
            MemoryDisk("disk-os", "contract_os", os_data, {"format": "cow"}),
            MemoryDisk("disk-data", "contract_data", bytearray(realistic_bytes(3 * CHUNK, 7))),
        ],
        config=b'{"name": "contract"}',
    )
    source = MemorySource(vm)
    journal = Journal(tmp_path / "journal")
    pool = ThreadCpuPool(harness.keys, CHUNK, workers=2, capacity=8)
    try:
        snapshots = []
        for level in ("full", "incremental"):
            outcome = await run_backup(
                store=store, pool=pool, source=source, journal=journal, level=level
            )
            assert outcome.record.state is State.SUCCEEDED, outcome.record.error
            assert outcome.manifest is not None
            snapshots.append((outcome.manifest, {d.disk_id: bytes(d.data) for d in vm.disks}))
            vm.write("disk-os", 5 * CHUNK + 17, os.urandom(3000))  # between the backups
        full, incremental = (m for m, _ in snapshots)
        assert (incremental.level, incremental.parent) == ("incremental", full.snapshot_id)
        assert [e.snapshot_id for e in store.snapshots("vm-contract")] == [
            full.snapshot_id,
            incremental.snapshot_id,
        ]
        for manifest, disks in snapshots:
            targets = MemoryTargets()
            restored = await run_restore(
                store=store,
                pool=pool,
                snapshot_id=manifest.snapshot_id,
                disks=None,
                plugin="memory",
                make_target=targets.make_target,
                journal=journal,
                writers=2,
            )
            assert restored.record.state is State.SUCCEEDED, restored.record.error
            assert targets.published == disks
    finally:
        await pool.aclose()
    assert harness.leftovers() == []
