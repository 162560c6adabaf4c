"""engine.maint.verify through the store API: findings for each kind of damage (with the
snapshots and VMs they affect), damage marks, the bad-chunk list and healing, sampling
oldest-verified first, resumption after an interrupted run, repair."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli.main import build_parser, main
from engine.core.ids import ChunkId, short
from engine.maint.repair import repair
from engine.maint.verify import (
    VerifyOptions,
    VerifyProgress,
    VerifyState,
    verify,
)
from engine.store.chunk_store import Store
from engine.store.damage import DAMAGED_NAME, damage_of, read_damage
from engine.store.index import BadChunk
from engine.store.manifest import Manifest
from engine.store.pack import PackWriter, pack_path
from engine.util import failpoints
from tests.conftest import PASSPHRASE, StoreFactory
from tests.helpers import read_disk, realistic_bytes, write_snapshot

CHUNK = 64 * 1024


class Interrupted(Exception):
    """Stands for a kill in the middle of a run (the integration test really kills)."""


@pytest.fixture
def two(make_store: StoreFactory) -> tuple[Store, Manifest, Manifest, bytes, bytes]:
    """vm-a and vm-b share their first 6 chunks; returns (store, a, b, disk a, disk b)."""
    store = make_store()
    disk_a = realistic_bytes(12 * CHUNK, seed=5)
    disk_b = disk_a[: 6 * CHUNK] + os.urandom(6 * CHUNK)
    a = write_snapshot(store, "vm-a", {"d": disk_a})
    b = write_snapshot(store, "vm-b", {"d": disk_b})
    return store, a, b, disk_a, disk_b


def slot_id(store: Store, m: Manifest, slot: int) -> ChunkId:
    with store.open_diskmap(m, m.disks[0]) as dm:
        return dm.get(slot)


def flip(store: Store, cid: bytes, at: int = 60) -> str:
    loc = store.index.lookup(cid)
    assert loc is not None
    path = pack_path(store.layout.packs, loc.pack)
    with path.open("r+b") as f:
        f.seek(loc.offset + at)
        byte = f.read(1)
        f.seek(loc.offset + at)
        f.write(bytes([byte[0] ^ 0x01]))
    return loc.pack


def listed(doc: dict[str, object]) -> list[str]:
    """The chunk ids a damage mark lists."""
    chunks = doc["chunks"]
    assert isinstance(chunks, list)
    return [c["id"] for c in chunks]


def reopen_ro(store: Store) -> Store:
    return Store.open(store.path, passphrase=PASSPHRASE, writable=False)


@pytest.fixture
def no_failpoints() -> Iterator[None]:
    yield
    failpoints.install(None)


# --- findings -----------------------------------------------------------------------------


def test_clean_store(two: tuple[Store, Manifest, Manifest, bytes, bytes]) -> None:
    store = two[0]
    result = verify(store, VerifyOptions(data=True))
    assert result.ok, result.findings
    assert result.snapshots == 2 and result.packs_checked == result.packs_total > 0
    assert result.chunks_checked == store.index.stats().chunks
    assert not result.damaged and not store.index.bad_chunks()


def test_flipped_byte_marks_shared_chunk_and_both_snapshots(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, a, b, _, _ = two
    shared, only_a = slot_id(store, a, 1), slot_id(store, a, 9)
    pack = flip(store, shared)
    flip(store, only_a, at=80)
    with reopen_ro(store) as ro:  # verify runs read-only (beside the writer)
        result = verify(ro, VerifyOptions(data=True))
    assert not result.ok
    by_subject = {f.subject: f for f in result.findings}
    f = by_subject[short(shared)]
    assert f.kind == "bad-chunk" and pack in f.message
    assert f.snapshots == tuple(sorted((a.snapshot_id, b.snapshot_id)))
    assert f.vms == ("vm-a", "vm-b")
    assert by_subject[short(only_a)].snapshots == (a.snapshot_id,)
    assert result.damaged == sorted((a.snapshot_id, b.snapshot_id))
    assert result.vms == ["vm-a", "vm-b"] and result.marked_bad == 2
    # persisted: the bad list (seen by the writer's has) and the damage marks
    assert {bc.chunk_id for bc in store.index.bad_chunks()} == {shared, only_a}
    assert not store.has(shared) and not store.has(only_a)
    doc = read_damage(store.layout, a.snapshot_id)
    assert doc is not None
    assert set(listed(doc)) == {shared.hex(), only_a.hex()}
    assert doc["vm"] == {"id": "vm-a", "name": "vm-a"}
    # a second verify, structure only, still reports them (the list is persistent)
    again = verify(store)
    assert {f.subject for f in again.findings} == {short(shared), short(only_a)}


def test_truncated_and_missing_packs(two: tuple[Store, Manifest, Manifest, bytes, bytes]) -> None:
    store, a, b, _, _ = two
    packs = sorted(p.name for p in store.index.packs())
    assert len(packs) >= 2
    truncated, missing = pack_path(store.layout.packs, packs[0]), packs[1]
    os.truncate(truncated, truncated.stat().st_size // 2)
    pack_path(store.layout.packs, missing).unlink()
    with reopen_ro(store) as ro:
        result = verify(ro)  # structure only: the pack sizes tell
    kinds = {(f.kind, f.subject) for f in result.findings}
    assert ("pack", packs[0]) in kinds and ("pack", missing) in kinds
    chunk_findings = [f for f in result.findings if f.kind != "pack"]
    assert chunk_findings and all(f.snapshots for f in chunk_findings)
    assert any(missing in f.message for f in chunk_findings)
    assert set(result.damaged) <= {a.snapshot_id, b.snapshot_id} and result.damaged
    bad = {bc.chunk_id: bc for bc in store.index.bad_chunks()}
    assert bad and {bc.pack for bc in bad.values()} <= {packs[0], missing}
    # --data does not try to read the broken packs' records one by one
    with reopen_ro(store) as ro:
        data = verify(ro, VerifyOptions(data=True))
    assert data.packs_checked == data.packs_total
    assert {f.subject for f in data.findings} >= {packs[0], missing}


def test_missing_diskmap_and_tampered_manifest(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, a, b, _, _ = two
    (store.layout.snapshot_dir(a.snapshot_id) / a.disks[0].diskmap).unlink()
    manifest = store.layout.manifest(b.snapshot_id)
    manifest.write_bytes(manifest.read_bytes().replace(b'"level":"full"', b'"level":"incr"'))
    result = verify(store)
    by_kind = {f.kind: f for f in result.findings}
    assert by_kind["diskmap"].subject == f"{a.snapshot_id}/{a.disks[0].diskmap}"
    assert by_kind["diskmap"].vms == ("vm-a",)
    assert by_kind["manifest"].snapshots == (b.snapshot_id,)
    assert by_kind["manifest"].vms == ("vm-b",)
    assert "MAC mismatch" in by_kind["manifest"].message
    assert result.damaged == sorted((a.snapshot_id, b.snapshot_id))
    doc_a = damage_of(store.layout, store.index, a.snapshot_id)
    doc_b = damage_of(store.layout, store.index, b.snapshot_id)
    assert doc_a is not None and doc_a["diskmaps"]
    assert doc_b is not None and "MAC mismatch" in str(doc_b["manifest"])


def test_findings_all_reported_not_only_the_first(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, a, _, _, _ = two
    ids = [slot_id(store, a, s) for s in range(0, 12, 2)]
    for cid in ids:
        flip(store, cid)
    result = verify(store, VerifyOptions(data=True))
    assert {f.subject for f in result.findings} == {short(c) for c in ids}


# --- heal ---------------------------------------------------------------------------------


def test_heal_by_next_backup(two: tuple[Store, Manifest, Manifest, bytes, bytes]) -> None:
    store, a, b, disk_a, disk_b = two
    shared = slot_id(store, a, 2)
    old = store.index.lookup(shared)
    flip(store, shared)
    with reopen_ro(store) as ro:
        verify(ro, VerifyOptions(data=True))
    assert damage_of(store.layout, store.index, a.snapshot_id) is not None
    assert not store.has(shared)
    # the next backup of the same data stores a good record and the index points to it
    c = write_snapshot(store, "vm-a", {"d": disk_a})
    new = store.index.lookup(shared)
    assert new is not None and old is not None and new.pack != old.pack
    assert store.has(shared) and not store.index.bad_chunks()
    # the marks are gone (the chunk was the only damage), restores are byte-identical
    for m in (a, b):
        assert not (store.layout.snapshot_dir(m.snapshot_id) / DAMAGED_NAME).exists()
        assert damage_of(store.layout, store.index, m.snapshot_id) is None
    assert read_disk(store, a) == disk_a and read_disk(store, b) == disk_b
    assert read_disk(store, c) == disk_a
    assert verify(store, VerifyOptions(data=True)).ok


def test_heal_of_one_chunk_keeps_mark_of_another(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, a, _, disk_a, _ = two
    first, last = slot_id(store, a, 0), slot_id(store, a, 11)
    flip(store, first)
    flip(store, last)
    verify(store, VerifyOptions(data=True))
    store.put_chunk(disk_a[:CHUNK])  # only the first chunk's data comes back
    store.flush()
    doc = damage_of(store.layout, store.index, a.snapshot_id)
    assert doc is not None and listed(doc) == [last.hex()]
    raw = read_damage(store.layout, a.snapshot_id)  # the file itself was rewritten
    assert raw is not None and listed(raw) == [last.hex()]


def test_missing_chunk_is_healed_too(two: tuple[Store, Manifest, Manifest, bytes, bytes]) -> None:
    store, a, _, disk_a, _ = two
    packs = {p.name for p in store.index.packs()}
    victim = slot_id(store, a, 3)
    loc = store.index.lookup(victim)
    assert loc is not None
    store.index.drop_pack(loc.pack)  # as recovery does for a lost pack
    result = verify(store)
    assert any(f.kind == "missing-chunk" and f.subject == short(victim) for f in result.findings)
    assert victim in {bc.chunk_id for bc in store.index.bad_chunks()}
    write_snapshot(store, "vm-a", {"d": disk_a})
    assert not store.index.bad_chunks()
    assert damage_of(store.layout, store.index, a.snapshot_id) is None
    assert read_disk(store, a) == disk_a
    assert packs  # (the dropped pack's other chunks came back with the same backup)


def test_mark_is_conditional_on_the_location(make_store: StoreFactory) -> None:
    store = make_store()
    cid = store.put_chunk(b"x" * 1000)
    store.flush()
    loc = store.index.lookup(cid)
    assert loc is not None
    stale = BadChunk(cid, "0" * 32, loc.offset, "was bad elsewhere", "t")
    missing = BadChunk(cid, None, None, "missing", "t")
    assert store.index.mark_bad([stale, missing]) == 0  # it is stored, and not there
    assert store.has(cid)
    assert store.index.mark_bad([BadChunk(cid, loc.pack, loc.offset, "bad", "t")]) == 1
    assert not store.has(cid)
    assert store.index.unmark_bad([cid]) == 1 and store.has(cid)


def test_heal_is_crash_safe(make_store: StoreFactory, no_failpoints: None) -> None:
    """Killed between the new pack's seal and its index commit: the old row and the mark
    stay; the next open indexes the sealed pack from its trailer, which heals."""
    store = make_store()
    data = realistic_bytes(CHUNK, seed=9)
    cid = store.put_chunk(data)
    store.flush()
    flip(store, cid)
    verify(store, VerifyOptions(data=True))
    assert store.index.bad_chunks()

    def crash(name: str) -> None:
        if name == "store.index.before_commit":
            raise Interrupted(name)

    failpoints.install(crash)
    store.put_chunk(data)
    with pytest.raises(Interrupted):
        store.flush()
    failpoints.install(None)
    assert [b.chunk_id for b in store.index.bad_chunks()] == [cid]  # rolled back
    store.close()
    with Store.open(store.path, passphrase=PASSPHRASE) as again:
        assert again.report.indexed_packs and not again.index.bad_chunks()
        assert again.read_chunk(cid) == data


# --- sampling, state, resumption -----------------------------------------------------------


def many_packs(store: Store, packs: int, per_pack: int = 4) -> list[str]:
    """Tiny records in ``packs`` small packs, through the store's codec (fast)."""
    names = []
    for p in range(packs):
        writer = PackWriter(store.layout.packs)
        for r in range(per_pack):
            plain = f"pack {p} record {r}".encode() * 20
            cid = store.codec.chunk_id(plain)
            writer.append(cid, store.codec.encode(plain, cid), len(plain))
        store.add_sealed_pack(writer.seal())
        names.append(writer.name)
    return names


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        self.t += 1
        return self.t


def test_percent_samples_oldest_first(make_store: StoreFactory) -> None:
    store = make_store()
    names = many_packs(store, 20)
    clock = Clock()
    full = verify(store, VerifyOptions(data=True, now=clock))
    assert full.packs_checked == 20 and full.chunks_checked == 80
    state = VerifyState(store.path)
    assert set(state.last_verified()) == set(names)
    runs: list[set[str]] = []
    for _ in range(10):
        before = state.last_verified()
        r = verify(store, VerifyOptions(percent=10, now=clock))
        assert r.packs_checked == r.packs_in_run == 2 and r.chunks_checked == 8
        after = state.last_verified()
        done = {n for n in names if after[n] != before[n]}
        assert len(done) == 2
        # the two least recently verified packs
        assert done == set(sorted(names, key=before.__getitem__)[:2])
        runs.append(done)
    assert set().union(*runs) == set(names)  # ten 10 % runs cover the store once
    state.close()


def test_percent_rounds_up_and_never_verified_first(make_store: StoreFactory) -> None:
    store = make_store()
    names = many_packs(store, 7)
    clock = Clock()
    r = verify(store, VerifyOptions(percent=10, now=clock))
    assert r.packs_in_run == 1  # ceil(0.7)
    names += many_packs(store, 2)
    state = VerifyState(store.path)
    (first,) = state.last_verified()
    r = verify(store, VerifyOptions(percent=30, now=clock))
    assert r.packs_in_run == 3  # ceil(2.7), all never verified before
    verified = state.last_verified()
    assert len(verified) == 4 and set(verified) <= set(names)
    assert verified[first] < min(t for n, t in verified.items() if n != first)
    state.close()


def test_interrupted_run_resumes(make_store: StoreFactory, no_failpoints: None) -> None:
    store = make_store()
    names = many_packs(store, 10)
    clock = Clock()
    seen: list[VerifyProgress] = []
    hits = 0

    def kill_at_4th(name: str) -> None:
        nonlocal hits
        if name == "verify.pack.done":
            hits += 1
            if hits == 4:
                raise Interrupted

    failpoints.install(kill_at_4th)
    with pytest.raises(Interrupted):
        verify(store, VerifyOptions(data=True, now=clock, progress=seen.append))
    failpoints.install(None)
    assert [p.done for p in seen] == [1, 2, 3]  # progress per pack, bytes too
    assert seen[-1].bytes_done < seen[-1].bytes_total
    first = VerifyState(store.path).last_verified()
    assert len(first) == 4  # the 4th was recorded before the kill
    r = verify(store, VerifyOptions(data=True, now=clock))
    assert r.resumed and r.packs_checked == 6 and r.packs_in_run == 10
    after = VerifyState(store.path).last_verified()
    assert set(after) == set(names)
    assert all(after[n] == first[n] for n in first)  # the killed run's packs were not reread
    again = verify(store, VerifyOptions(data=True, now=clock))  # finished: a new run
    assert not again.resumed and again.packs_checked == 10


def test_other_options_start_a_new_run(make_store: StoreFactory, no_failpoints: None) -> None:
    store = make_store()
    many_packs(store, 10)

    def kill(name: str) -> None:
        if name == "verify.pack.done":
            raise Interrupted

    failpoints.install(kill)
    with pytest.raises(Interrupted):
        verify(store, VerifyOptions(data=True))
    failpoints.install(None)
    r = verify(store, VerifyOptions(percent=50))
    assert not r.resumed and r.packs_checked == 5


def test_findings_of_an_interrupted_run_are_not_lost(
    two: tuple[Store, Manifest, Manifest, bytes, bytes], no_failpoints: None
) -> None:
    store, a, _, _, _ = two
    cid = slot_id(store, a, 10)
    bad_pack = flip(store, cid)
    order = sorted(p.name for p in store.index.packs())
    hits = 0

    def kill_after_bad_pack(name: str) -> None:
        nonlocal hits
        if name == "verify.pack.done":
            hits += 1
            if store.index.bad_chunks():
                raise Interrupted

    failpoints.install(kill_after_bad_pack)
    with pytest.raises(Interrupted):
        verify(store, VerifyOptions(data=True))
    failpoints.install(None)
    r = verify(store, VerifyOptions(data=True))
    assert r.resumed and r.packs_checked == len(order) - hits
    assert any(f.subject == short(cid) and bad_pack in f.message for f in r.findings)
    assert a.snapshot_id in r.damaged


def test_encrypted_only_replica_checks_crc(make_store: StoreFactory, tmp_path: Path) -> None:
    """Without the data key records are checked by CRC and id (what a replica can do)."""
    store = make_store()
    cid = store.put_chunk(realistic_bytes(CHUNK, seed=3))
    store.flush()
    store.keys = type(store.keys)(store.keys.id_key, store.keys.mac_key, None)
    assert verify(store, VerifyOptions(data=True)).ok
    flip(store, cid)
    result = verify(store, VerifyOptions(data=True))
    assert [f.subject for f in result.findings] == [short(cid)]
    assert "CRC" in result.findings[0].message


# --- repair -------------------------------------------------------------------------------


def test_repair_reseals_a_pack_whose_footer_is_broken(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, a, b, disk_a, disk_b = two
    loc = store.index.lookup(slot_id(store, b, 11))
    assert loc is not None
    path = pack_path(store.layout.packs, loc.pack)
    records = store.index.packs()[[p.name for p in store.index.packs()].index(loc.pack)].records
    with path.open("r+b") as f:  # break the footer: the trailer cannot be read
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    result = repair(store)
    assert result.quarantined == [] and not result.lost and result.verify.ok
    assert [(r.pack, r.kept, r.lost) for r in result.resealed] == [(loc.pack, records, [])]
    assert not path.exists() and (store.path / "quarantine" / path.name).exists()
    note = json.loads((store.path / "quarantine" / f"{loc.pack}.json").read_text())
    assert note["replaced_by"] == result.resealed[0].new_pack and note["kept"] == records
    assert read_disk(store, a) == disk_a and read_disk(store, b) == disk_b
    assert verify(store, VerifyOptions(data=True)).ok


def test_repair_quarantines_a_pack_without_intact_records(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
) -> None:
    store, _, b, _, disk_b = two
    victim = slot_id(store, b, 11)  # only vm-b uses it
    loc = store.index.lookup(victim)
    assert loc is not None
    path = pack_path(store.layout.packs, loc.pack)
    size = path.stat().st_size
    with path.open("r+b") as f:  # every record and the trailer overwritten
        f.seek(24)
        f.write(b"\x00" * (size - 24))
    result = repair(store)
    assert [q.pack for q in result.quarantined] == [loc.pack]
    moved = store.path / "quarantine" / path.name
    assert moved.exists() and not path.exists()
    note = json.loads((store.path / "quarantine" / f"{loc.pack}.json").read_text())
    assert note["pack"] == loc.pack and "no intact record" in note["reason"]
    assert result.lost and b.snapshot_id in result.verify.damaged
    assert "vm-b" in result.verify.vms
    missing = [f for f in result.verify.findings if f.kind == "missing-chunk"]
    assert any(f.subject == short(victim) and b.snapshot_id in f.snapshots for f in missing)
    assert damage_of(store.layout, store.index, b.snapshot_id) is not None
    # what was lost comes back with the next backup of the data
    write_snapshot(store, "vm-b", {"d": disk_b})
    assert damage_of(store.layout, store.index, b.snapshot_id) is None
    assert read_disk(store, b) == disk_b


def test_repair_of_a_whole_store(two: tuple[Store, Manifest, Manifest, bytes, bytes]) -> None:
    store = two[0]
    result = repair(store)
    assert not result.lost and not result.quarantined and result.verify.ok
    assert result.indexed_chunks == store.index.stats().chunks > 0


# --- command line -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0", "101", "ten"])
def test_cli_rejects_bad_percent(bad: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["store", "verify", str(tmp_path), "--percent", bad])
    assert e.value.code == 2


def test_cli_verify_text_names_vms(
    two: tuple[Store, Manifest, Manifest, bytes, bytes],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, a, b, _, _ = two
    flip(store, slot_id(store, a, 0))
    monkeypatch.setenv("TESSERA_PASSPHRASE", PASSPHRASE.decode())
    assert main(["store", "verify", str(store.path), "--percent", "100"]) == 3
    out = capsys.readouterr().out
    assert f"(snapshots: {min(a.snapshot_id, b.snapshot_id)}" in out and "VMs: vm-a, vm-b" in out
    assert "run 1: " in out and "(100 %)" in out
    assert main(["snapshots", "--store", str(store.path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].endswith("PROTECTED  DAMAGED")
    assert all(line.endswith("yes (1 chunks)") for line in table[1:])
