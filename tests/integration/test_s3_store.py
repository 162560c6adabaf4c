"""A store whose packs live in a bucket of a real Ceph RGW (``engine.store.remote``).

What users rely on, beyond the store contract (``tests/contract/test_store.py`` runs on such
a store too):

- ``packs/`` is a cache bounded by its setting: a snapshot many times the bound is written
  and read back whole, evicted packs are fetched again, and the bucket holds every pack;
- a writer SIGKILLed anywhere around an upload leaves a store whose committed snapshots read
  back, that verifies clean, and whose bucket holds no object the index does not know — also
  when the killed writer's local copy of the pack is gone (its upload intent names it);
- the index rebuilds from the bucket when ``index.db`` and the cache are both gone;
- GC retires packs with trash markers and deletes their objects after the grace period;
  verify finds a damaged object and names its pack;
- a prefix holding a store is refused at init; a wrong key or a missing key file is a clear
  error naming the bucket or the file.
"""

import json
import random
import shutil
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.core.errors import (
    BudgetSpent,
    ObjectStoreError,
    StoreError,
    StoreLocked,
    StoreWriteError,
)
from engine.daemon.service import _bucket_counts as bucket_counts
from engine.io.s3 import S3Endpoint
from engine.maint.check import check_store
from engine.maint.gc import GcOptions, gc
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.layout import RemoteConfig
from engine.store.objects import S3Packs
from engine.store.pack import pack_path
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot
from tests.integration.crash_writer import disks_b
from tests.integration.test_store_crash import run_writer

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
PACK = 1024 * 1024


def init(
    path: Path,
    bucket: S3Endpoint,
    cache_packs: int = 2,
    prefix: str = "st/",
    object_lock: str = "",
    lock_seconds: int = 0,
) -> None:
    """A store of 64 KiB chunks and 1 MiB packs in ``bucket`` (``object_lock``: locking
    what it puts for ``lock_seconds``)."""
    remote = RemoteConfig(
        bucket.url,
        bucket.bucket,
        prefix,
        cache_bytes=cache_packs * PACK,
        object_lock=object_lock,
        lock_seconds=lock_seconds,
    )
    Store.init(
        path,
        chunk_size=CHUNK,
        pack_size=PACK,
        passphrase=PASSPHRASE,
        kdf=CHEAP_KDF,
        remote=remote,
        s3_key=(bucket.access_key, bucket.secret_key),
    )


def in_bucket(store: Store) -> dict[str, int]:
    assert store.remote is not None
    return {p.name: p.size for p in store.remote.objects.list()}


def assert_bucket_matches_index(store: Store) -> None:
    """Every object is an indexed pack (or waits in the trash), every indexed pack is there."""
    indexed = {p.name: p.size for p in store.index.packs()}
    objects = in_bucket(store)
    trashed = set(store.layout.trash_files())
    assert {n: s for n, s in objects.items() if n not in trashed} == indexed
    assert not store.index.uploads()


@pytest.fixture
def s3_store(tmp_path: Path, s3_bucket: S3Endpoint) -> tuple[Path, str, bytes]:
    """A store in a bucket with snapshot A (24 chunks, a few packs) committed."""
    path = tmp_path / "store"
    init(path, s3_bucket)
    disk_a = realistic_bytes(24 * CHUNK, seed=100)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm-a", {"d0": disk_a})
    return path, m.snapshot_id, disk_a


def test_a_snapshot_many_times_the_cache_reads_back_through_fetches(
    tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, s3_bucket, cache_packs=2)
    disk = realistic_bytes(16 * CHUNK, seed=1) + bytes(CHUNK) + _random(96 * CHUNK, seed=2)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.remote is not None
        at_open = store.remote.objects.counters.snapshot()["put"].requests  # probe, lock
        m = write_snapshot(store, "vm", {"d0": disk})
        packs = store.index.packs()
        assert len(packs) >= 6, "the snapshot must span several times the cache"
        assert store.remote.cached_bytes <= store.remote.limit
        assert len(store.layout.pack_files()) <= 2
        assert in_bucket(store) == {p.name: p.size for p in packs}
        puts = store.remote.objects.counters.snapshot()["put"]
        snapshot_files = 2  # its DiskMap and manifest
        assert puts.requests - at_open == len(packs) + snapshot_files
        counts = bucket_counts(store)  # what the daemon's /metrics exports
        assert counts.requests["put"] == puts.requests and counts.bytes["put"] == puts.bytes
        assert counts.cache_bytes == store.remote.cached_bytes
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.remote is not None
        assert read_disk(store, m) == disk
        assert store.remote.fetches >= len(packs) - 2
        assert store.remote.cached_bytes <= store.remote.limit
        result = check_store(store, data=True)
        assert result.ok, result.findings
        assert_bucket_matches_index(store)


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


KILL_POINTS = [
    ("store.pack.after_dir_fsync", 1),  # sealed here, no intent yet
    ("store.remote.before_put", 1),  # intent durable, nothing sent
    ("store.remote.after_put", 1),  # in the bucket, not indexed
    ("store.index.before_commit", 1),
    ("store.index.after_commit", 1),
    ("store.remote.after_put", 2),
    ("store.manifest.after_rename", 1),  # committed
]


@pytest.mark.parametrize(("point", "nth"), KILL_POINTS, ids=[f"{p}#{n}" for p, n in KILL_POINTS])
def test_a_writer_killed_around_an_upload_loses_nothing_and_leaves_no_orphan(
    s3_store: tuple[Path, str, bytes], point: str, nth: int
) -> None:
    path, snap_a, disk_a = s3_store
    proc = run_writer(path, point, nth, 7)
    assert proc.returncode == -signal.SIGKILL, f"never reached: {proc.stdout}{proc.stderr}"
    committed = point == "store.manifest.after_rename"
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert not store.report.problems, store.report.lines()
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        names = {e.vm_name: e.snapshot_id for e in store.snapshots()}
        assert ("vm-b" in names) == committed
        if committed:
            mb = store.manifest(names["vm-b"])
            for i, data in enumerate(disks_b(7, CHUNK).values()):
                assert read_disk(store, mb, i) == data
        assert_bucket_matches_index(store)
        result = check_store(store, data=True)
        assert result.ok, result.findings
        disk_c = realistic_bytes(6 * CHUNK, seed=8)
        mc = write_snapshot(store, "vm-c", {"d0": disk_c})
        assert read_disk(store, mc) == disk_c
        assert_bucket_matches_index(store)


def test_a_killed_upload_whose_local_copy_is_gone_is_deleted_from_the_bucket(
    s3_store: tuple[Path, str, bytes],
) -> None:
    path, snap_a, disk_a = s3_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        before = set(in_bucket(store))
        indexed = {p.name for p in store.index.packs()}
    assert run_writer(path, "store.remote.after_put", 1, 7).returncode == -signal.SIGKILL
    orphans = [p for name, p in cached_packs(path).items() if name not in indexed]
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
        uploaded = [p.stem for p in orphans if p.stem in in_bucket(store)]
    assert uploaded, "the killed writer's packs are uploaded (two sealers), not indexed"
    for copy in orphans:  # the local copies are lost (a cache disk replaced, say)
        copy.unlink()
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert set(uploaded) <= set(store.report.removed_uploads), store.report.lines()
        assert set(in_bucket(store)) == before
        assert_bucket_matches_index(store)
        assert read_disk(store, store.manifest(snap_a)) == disk_a


def cached_packs(path: Path) -> dict[str, Path]:
    return {p.stem: p for p in (path / "packs").glob("??/*.pack")}


def test_the_index_rebuilds_from_the_bucket_when_it_and_the_cache_are_gone(
    s3_store: tuple[Path, str, bytes],
) -> None:
    path, snap_a, disk_a = s3_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        disk_b = realistic_bytes(40 * CHUNK, seed=5)
        mb = write_snapshot(store, "vm-b", {"d0": disk_b})
        rows = sorted((p.name, p.size, p.records) for p in store.index.packs())
    for p in path.glob("index.db*"):
        p.unlink()
    shutil.rmtree(path / "packs")
    (path / "packs" / "tmp").mkdir(parents=True)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert sorted((p.name, p.size, p.records) for p in store.index.packs()) == rows
        assert len(store.report.indexed_packs) == len(rows)
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        assert read_disk(store, mb) == disk_b
        result = check_store(store, data=True)
        assert result.ok, result.findings


def test_gc_retires_by_markers_and_deletes_objects_after_the_grace(
    tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, s3_bucket, cache_packs=2)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    old = _random(48 * CHUNK, seed=3)  # 3 packs of its own
    kept = realistic_bytes(16 * CHUNK, seed=4)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        write_snapshot(store, "vm", {"d0": old}, time=t0)
        mk = write_snapshot(store, "vm", {"d0": kept}, time=t0 + timedelta(days=1))
        prune(store, Rules(keep_last=1))
        objects_before = set(in_bucket(store))
        now = datetime.now(UTC) + timedelta(days=30)  # the removal's grace is over
        opts = GcOptions(now=lambda: now, young_pack_margin=timedelta(0))
        first = gc(store, opts)
        assert first.packs_trashed >= 3
        markers = list(store.layout.trash.glob("*.remote"))
        assert len(markers) == first.packs_trashed
        assert set(in_bucket(store)) == objects_before, "objects wait for the grace period"
        assert read_disk(store, mk) == kept
        later = now + timedelta(days=30)
        second = gc(store, GcOptions(now=lambda: later, young_pack_margin=timedelta(0)))
        assert second.trash_deleted == first.packs_trashed
        assert second.trash_bytes_freed == first.bytes_retired
        assert not list(store.layout.trash.glob("*.remote"))
        assert_bucket_matches_index(store)
        assert read_disk(store, mk) == kept
        result = check_store(store, data=True)
        assert result.ok, result.findings


def test_verify_names_a_damaged_object(s3_store: tuple[Path, str, bytes]) -> None:
    path, _, _ = s3_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.remote is not None
        objects = store.remote.objects
        assert isinstance(objects, S3Packs)
        name = store.index.packs()[0].name
        data = bytearray(objects.read(name, 0, 1 << 30))
        data[200] ^= 0xFF
        objects.client.delete([objects.key(name)])
        objects.client.put(objects.key(name), bytes(data))
        store.remote.forget(name)
        result = check_store(store, data=True)
        assert not result.ok
        assert any(name in f.message for f in result.findings), result.findings


def test_a_prefix_holding_a_store_is_refused(tmp_path: Path, s3_bucket: S3Endpoint) -> None:
    init(tmp_path / "one", s3_bucket, prefix="p/")
    store_id = json.loads((tmp_path / "one" / "config.json").read_bytes())["store_id"]
    with pytest.raises(StoreError, match=f"already holds store {store_id}"):
        init(tmp_path / "two", s3_bucket, prefix="p/")
    assert not (tmp_path / "two").exists(), "nothing is written here before the bucket agrees"
    init(tmp_path / "three", s3_bucket, prefix="q/")  # another prefix is another store


def test_a_wrong_key_or_a_missing_key_file_is_a_clear_error(
    s3_store: tuple[Path, str, bytes], s3_bucket: S3Endpoint
) -> None:
    path, _, _ = s3_store
    keyfile = path / "keys" / "s3.json"
    assert keyfile.stat().st_mode & 0o077 == 0
    saved = keyfile.read_bytes()
    keyfile.write_text(json.dumps({"access_key": s3_bucket.access_key, "secret_key": "wrong"}))
    with pytest.raises(ObjectStoreError) as e:
        Store.open(path, passphrase=PASSPHRASE)
    assert s3_bucket.bucket in str(e.value) and "wrong" not in str(e.value)
    keyfile.unlink()
    with pytest.raises(StoreError, match=r"S3 key .* is missing"):
        Store.open(path, passphrase=PASSPHRASE)
    keyfile.write_bytes(saved)
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
        assert store.snapshots()


def test_cached_copy_of_the_wrong_size_is_dropped_not_the_pack(
    s3_store: tuple[Path, str, bytes],
) -> None:
    path, snap_a, disk_a = s3_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        name = store.index.packs()[0].name
        store.pack_file(name)  # cached
    copy = pack_path(path / "packs", name)
    with copy.open("r+b") as f:
        f.truncate(100)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert any(name in line for line in store.report.dropped_cache)
        assert not store.report.dropped_packs
        assert read_disk(store, store.manifest(snap_a)) == disk_a


def test_the_bucket_alone_re_attaches_and_restores_byte_identical(
    s3_store: tuple[Path, str, bytes], tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    path, snap_a, disk_a = s3_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        t0 = datetime(2026, 11, 1, tzinfo=UTC)
        gone = write_snapshot(store, "vm-b", {"d0": realistic_bytes(4 * CHUNK, seed=6)}, time=t0)
        disk_b = realistic_bytes(40 * CHUNK, seed=5)
        mb = write_snapshot(store, "vm-b", {"d0": disk_b}, time=t0 + timedelta(days=1))
        assert prune(store, Rules(keep_last=1), vm="vm-b").removed == [gone.snapshot_id]
        assert store.remote is not None
        assert not list(store.remote.objects.keys(f"snapshots/{gone.snapshot_id}/"))
        rows = sorted((p.name, p.size, p.records) for p in store.index.packs())
    shutil.rmtree(path)  # the DataMover is gone: only the bucket is left
    new = tmp_path / "attached"
    remote = RemoteConfig(s3_bucket.url, s3_bucket.bucket, "st/")
    config = Store.attach(new, remote, (s3_bucket.access_key, s3_bucket.secret_key))
    assert config.remote == remote
    with Store.open(new, passphrase=PASSPHRASE) as store:
        assert sorted((p.name, p.size, p.records) for p in store.index.packs()) == rows
        assert {e.snapshot_id for e in store.snapshots()} == {snap_a, mb.snapshot_id}
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        assert read_disk(store, store.manifest(mb.snapshot_id)) == disk_b
        result = check_store(store, data=True)
        assert result.ok, result.findings
        disk_d = realistic_bytes(6 * CHUNK, seed=9)  # and it writes on
        md = write_snapshot(store, "vm-d", {"d0": disk_d})
        assert read_disk(store, md) == disk_d
    with pytest.raises(StoreError, match="not empty"):
        Store.attach(new, remote, (s3_bucket.access_key, s3_bucket.secret_key))
    empty = RemoteConfig(s3_bucket.url, s3_bucket.bucket, "elsewhere/")
    with pytest.raises(StoreError, match="holds no Tessera store"):
        Store.attach(tmp_path / "none", empty, (s3_bucket.access_key, s3_bucket.secret_key))
    assert not (tmp_path / "none").exists()
    assert not (tmp_path / "none.attaching").exists()


def test_a_snapshot_whose_put_failed_is_put_by_the_next_open(
    s3_store: tuple[Path, str, bytes], tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    path, snap_a, _ = s3_store
    marker = path / "snapshots" / snap_a / ".in-bucket"
    assert marker.exists()
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.remote is not None
        store.snapshot_removed(snap_a)  # as if its put never happened: gone from the bucket
        (path / "snapshots" / snap_a / ".in-bucket").unlink()
        assert not list(store.remote.objects.keys(f"snapshots/{snap_a}/"))
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.report.uploaded_snapshots == [snap_a]
        assert store.remote is not None
        keys = sorted(store.remote.objects.keys(f"snapshots/{snap_a}/"))
        assert keys == [f"snapshots/{snap_a}/disk-0.dmap", f"snapshots/{snap_a}/manifest"]
    assert marker.exists()


def test_one_datamover_writes_a_prefix_at_a_time(
    s3_store: tuple[Path, str, bytes], tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    """A second store directory on the same prefix (another DataMover) is refused while the
    first holds the bucket's writer lock, reads meanwhile, and writes once it is released;
    a killed writer's own directory takes its lock over; break-lock frees a dead holder's."""
    path, snap_a, disk_a = s3_store
    other = tmp_path / "other"
    shutil.copytree(path, other)  # as a second DataMover would have it after an attach
    with Store.open(path, passphrase=PASSPHRASE):
        with pytest.raises(StoreLocked) as e:
            Store.open(other, passphrase=PASSPHRASE)
        assert str(path.resolve()) in str(e.value) and "break-lock" in str(e.value)
        with Store.open(other, passphrase=PASSPHRASE, writable=False) as reader:
            assert read_disk(reader, reader.manifest(snap_a)) == disk_a
    with Store.open(other, passphrase=PASSPHRASE):  # released by the first's close
        pass
    # A writer of the first directory is killed while it holds the lock …
    assert run_writer(path, "store.remote.after_put", 1, 7).returncode == -signal.SIGKILL
    with pytest.raises(StoreLocked):  # … which still keeps any other directory out,
        Store.open(other, passphrase=PASSPHRASE)
    with Store.open(path, passphrase=PASSPHRASE) as store:  # … while its own takes it over
        assert read_disk(store, store.manifest(snap_a)) == disk_a
    assert run_writer(path, "store.remote.after_put", 1, 8).returncode == -signal.SIGKILL
    held = Store.break_bucket_lock(other)  # the first DataMover is gone for good
    assert held is not None and str(path.resolve()) in held
    assert Store.break_bucket_lock(other) is None
    with Store.open(other, passphrase=PASSPHRASE) as store:
        assert read_disk(store, store.manifest(snap_a)) == disk_a


def test_a_spent_month_budget_refuses_work_by_name_and_loses_nothing(
    s3_store: tuple[Path, str, bytes],
) -> None:
    path, snap_a, disk_a = s3_store
    config = json.loads((path / "config.json").read_text())
    config["remote"]["requests_per_month"] = 60
    (path / "config.json").write_text(json.dumps(config))
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.remote is not None and store.remote.objects.budget is not None
        counts = bucket_counts(store)
        assert counts.month_budget == 60
        assert counts.month_requests == store.remote.objects.budget.used()[1] > 0
        spent = "request budget of 60 a month is spent"  # a refused upload fails its snapshot
        with pytest.raises((BudgetSpent, StoreWriteError), match=spent):
            for seed in range(100):  # each snapshot: a pack, its intent, DiskMap, manifest
                write_snapshot(store, f"vm-{seed}", {"d0": _random(20 * CHUNK, seed=seed)})
    with pytest.raises(BudgetSpent):  # even an open must not send what the budget forbids
        Store.open(path, passphrase=PASSPHRASE)
    config["remote"]["requests_per_month"] = 0  # the operator raises it
    (path / "config.json").write_text(json.dumps(config))
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        for e in store.snapshots():
            read_disk(store, store.manifest(e.snapshot_id))
        result = check_store(store, data=True)
        assert result.ok, result.findings
        assert_bucket_matches_index(store)


def test_a_restore_prefetches_the_packs_it_announced_within_the_cache(
    tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, s3_bucket, cache_packs=3)
    disk = _random(100 * CHUNK, seed=11)  # ~7 packs of 1 MiB
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm", {"d0": disk})
        names = [p.name for p in store.index.packs()]
    for copy in cached_packs(path).values():
        copy.unlink()
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
        assert store.remote is not None
        store.prefetch(names)  # what a restore's planner says of each window
        first = store.pack_file(names[0])  # waits for that pack's fetch, if under way
        assert first.exists()
        assert read_disk(store, m) == disk
        assert store.remote.prefetched >= 1
        assert store.remote.cached_bytes <= store.remote.limit


def test_a_full_cache_disk_fails_the_read_by_name_and_keeps_nothing_torn(
    tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    """The store directory (and so the cache) on a small tmpfs that fills up: reading a pack
    that must be fetched fails naming the pack, ENOSPC and the free space; no partial copy is
    left; once space is back the same read works."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tessera-test", small], check=True)
    try:
        path = small / "store"
        init(path, s3_bucket, cache_packs=2)
        disk = _random(40 * CHUNK, seed=12)  # ~3 packs
        with Store.open(path, passphrase=PASSPHRASE) as store:
            m = write_snapshot(store, "vm", {"d0": disk})
        for copy in cached_packs(path).values():
            copy.unlink()
        filler = small / "filler"
        free = shutil.disk_usage(small).free
        filler.write_bytes(b"\0" * (free - 64 * 1024))
        with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
            with pytest.raises(StoreWriteError) as e:
                read_disk(store, m)
            text = str(e.value)
            assert "cached copy of pack" in text and "ENOSPC" in text and "free" in text, text
            assert not list((path / "packs" / "tmp").iterdir())
            assert not cached_packs(path)
            filler.unlink()
            assert read_disk(store, m) == disk
    finally:
        subprocess.run(["umount", small], check=True)


def test_after_an_os_crash_cached_copies_are_dropped_and_fetched_again(
    s3_store: tuple[Path, str, bytes],
) -> None:
    """Fetched copies are not fsynced: a marker names the boot that fetched them, and the
    first open in another boot (an OS crash: a copy may be torn) drops every cached copy of
    an indexed pack; a sealed copy not indexed yet (recovery's) stays."""
    path, snap_a, disk_a = s3_store
    for copy in cached_packs(path).values():  # a cold cache: the read below fetches
        copy.unlink()
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        assert store.remote is not None and store.remote.fetches >= 1
    markers = list((path / "packs").glob("unsynced-*"))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert [m.name for m in markers] == [f"unsynced-{boot}"]
    # The machine crashed and came back: another boot id, and the copies may be torn.
    markers[0].rename(path / "packs" / "unsynced-0-before-the-crash")
    fetched = cached_packs(path)
    for copy in fetched.values():
        with copy.open("r+b") as f:
            f.seek(copy.stat().st_size // 2)
            f.write(bytes(4096))  # what a torn write leaves
    unindexed = path / "packs" / "ab" / ("ab" * 16 + ".pack")
    unindexed.parent.mkdir(exist_ok=True)
    unindexed.write_bytes(b"sealed here, not indexed yet")
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
        assert not set(fetched) & set(cached_packs(path))
        assert unindexed.exists()
        unindexed.unlink()  # not a real pack: out of the way of the checks below
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        assert check_store(store, data=True).ok
    assert [m.name for m in (path / "packs").glob("unsynced-*")] == [f"unsynced-{boot}"]
