"""Space accounting with known data: two VMs from one template, exact shared/unique bytes."""

from datetime import UTC, datetime, timedelta

from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID
from engine.maint.prune import prune, set_protected
from engine.maint.retention import Rules
from engine.maint.usage import StoreUsage, Usage, store_usage
from engine.store.chunk_store import Store
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes
from tests.unit.maint.test_prune import backup

C = 64 * 1024
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def changed(data: bytes, slot: int, seed: int) -> bytes:
    out = bytearray(data)
    out[slot * C : (slot + 1) * C] = realistic_bytes(C, seed=seed)
    return bytes(out)


def stored(store: Store, ids: set[bytes]) -> int:
    total = 0
    for i in ids:
        loc = store.index.lookup(i)
        assert loc is not None
        total += loc.length
    return total


def ids_of(store: Store, snapshot_id: str) -> set[bytes]:
    m = store.manifest(snapshot_id)
    out: set[bytes] = set()
    for disk in m.disks:
        with store.open_diskmap(m, disk) as dm:
            for block in dm.iter_blocks():
                out |= {block[i : i + CHUNK_ID_SIZE] for i in range(0, len(block), CHUNK_ID_SIZE)}
    return out - {ZERO_ID}


def by_name(usage: StoreUsage) -> dict[str, Usage]:
    out = {v.vm_name: v.usage for v in usage.vms}
    for v in usage.vms:
        for s in v.snapshots:
            out[s.snapshot_id] = s.usage
    return out


def test_two_vms_from_one_template(make_store: StoreFactory) -> None:
    store = make_store()
    template = realistic_bytes(40 * C, seed=3) + bytes(2 * C)  # 40 data slots, 2 zero slots
    s1 = backup(store, "vm-a", T0, template).snapshot_id
    s2 = backup(store, "vm-a", T0 + timedelta(days=1), changed(template, 7, 100)).snapshot_id
    b1 = backup(store, "vm-b", T0, changed(template, 5, 200)).snapshot_id
    set_protected(store, s1, True)

    usage = store_usage(store)
    u = by_name(usage)
    # snapshots: each 42 slots of logical size, 40 of data
    for sid in (s1, s2, b1):
        assert u[sid].logical_bytes == 42 * C and u[sid].data_bytes == 40 * C
        assert u[sid].chunks == 40 and u[sid].referenced_bytes == 40 * C
        assert u[sid].stored_bytes == stored(store, ids_of(store, sid))
    # s1 shares everything (s2 has 39 of its chunks, vm-b has its slot 7)
    assert u[s1].unique_chunks == 0 and u[s1].unique_bytes == 0 and u[s1].frees_bytes == 0
    assert u[s1].shared_bytes == 40 * C
    only_s2 = ids_of(store, s2) - ids_of(store, s1) - ids_of(store, b1)
    assert len(only_s2) == 1
    assert u[s2].unique_bytes == C and u[s2].shared_bytes == 39 * C
    assert u[s2].frees_bytes == stored(store, only_s2)
    assert u[b1].unique_bytes == C and u[b1].frees_bytes == stored(
        store, ids_of(store, b1) - ids_of(store, s1)
    )
    # VMs: vm-a has 41 distinct chunks; 2 are its own (new slot 7, template slot 5)
    a, b = u["vm-a"], u["vm-b"]
    assert (a.snapshots, a.chunks, a.referenced_bytes) == (2, 41, 41 * C)
    assert a.logical_bytes == 84 * C and a.data_bytes == 80 * C
    assert a.unique_chunks == 2 and a.unique_bytes == 2 * C and a.shared_bytes == 39 * C
    a_ids = ids_of(store, s1) | ids_of(store, s2)
    assert a.stored_bytes == stored(store, a_ids)
    assert a.frees_bytes == stored(store, a_ids - ids_of(store, b1))
    assert (b.chunks, b.unique_bytes, b.shared_bytes) == (40, C, 39 * C)
    # store totals
    t = usage.total
    assert (t.snapshots, t.chunks, t.referenced_bytes) == (3, 42, 42 * C)
    assert t.stored_bytes == usage.index_stored_bytes == stored(store, a_ids | ids_of(store, b1))
    assert usage.unreferenced_chunks == 0 and usage.removed_snapshots == 0
    assert t.missing_chunks == 0
    assert [s.protected for s in usage.vms[0].snapshots] == [True, False]
    doc = usage.doc()
    assert doc["total"]["shared_bytes"] == 0  # type: ignore[index]
    assert doc["vms"][0]["snapshot_usage"][1]["frees_bytes"] == u[s2].frees_bytes  # type: ignore[index]


def test_pruning_turns_unique_bytes_into_garbage(make_store: StoreFactory) -> None:
    store = make_store()
    template = realistic_bytes(20 * C, seed=4)
    s1 = backup(store, "vm-a", T0, template).snapshot_id
    s2 = backup(store, "vm-a", T0 + timedelta(days=1), changed(template, 7, 300)).snapshot_id
    s3 = backup(store, "vm-a", T0 + timedelta(days=2), changed(template, 9, 301)).snapshot_id
    before = by_name(store_usage(store))[s2]
    assert before.unique_chunks == 1  # its new slot 7
    # removing s1 and s2 frees s2's slot 7 and the template's slot 9 (which s3 replaced)
    freed = (ids_of(store, s1) | ids_of(store, s2)) - ids_of(store, s3)
    assert len(freed) == 2
    prune(store, Rules(keep_last=1), now=T0 + timedelta(days=30), tz=UTC)
    after = store_usage(store)
    assert after.total.snapshots == 1 and after.removed_snapshots == 2
    assert after.unreferenced_chunks == 2
    assert after.unreferenced_bytes == stored(store, freed)
    assert after.unreferenced_bytes > before.frees_bytes
    assert after.index_chunks == after.total.chunks + 2


def test_empty_store(make_store: StoreFactory) -> None:
    usage = store_usage(make_store())
    assert usage.vms == [] and usage.total == Usage()
