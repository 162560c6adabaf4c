"""A store in a bucket with object lock, on a real Ceph RGW (``engine.store.retention``).

What users rely on (the store and pack contracts run on such a bucket too):

- every object the store puts is locked in its mode until at least its write + the lock
  duration, and a locked pack is never deleted: not by GC or repair (the bucket refuses, and
  the pack waits in the trash with its date), not by the store's own key;
- a backup that deduplicates against older packs renews their locks, so each snapshot is
  immutable for the whole duration from its own backup;
- prune keeps a locked snapshot and says until when; GC keeps retired packs until their
  dates and says which it waits for, also when its clock is ahead of the bucket's;
- once the dates are past, prune and GC delete everything (every version) as usual;
- one DataMover writes a prefix at a time, decided by versions (RGW 16 ignores
  ``If-None-Match`` in versioned buckets); a killed writer's upload is deleted once its
  date is past; the bucket alone re-attaches, lock and all;
- a bucket unfit for the store is refused at open, saying why.
"""

import errno
import shutil
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from engine.core.errors import ObjectStoreUnfit, StoreLocked, StoreWriteError
from engine.io.s3 import S3Endpoint
from engine.maint.check import check_store
from engine.maint.gc import GcOptions, gc
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.layout import RemoteConfig, snapshot_lock
from engine.store.objects import S3Packs
from engine.store.retention import LockPolicy
from engine.util import failpoints
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot
from tests.integration.test_s3_store import cached_packs
from tests.integration.test_s3_store import init as init_store
from tests.integration.test_store_crash import run_writer
from tests.s3.rgw import BucketFactory

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
PACK = 1024 * 1024
DAY = 86400


def init(path: Path, bucket: S3Endpoint, seconds: int = DAY, mode: str = "GOVERNANCE") -> None:
    init_store(path, bucket, object_lock=mode, lock_seconds=seconds)


def objects(store: Store) -> S3Packs:
    assert store.remote is not None
    return store.remote.objects


def lock_of(store: Store, key: str) -> tuple[str, int] | None:
    held = objects(store).client.retention(objects(store).prefix + key)
    return None if held is None else (held.mode, int(held.until.timestamp()))


def pack_versions(store: Store) -> dict[str, int]:
    """{pack name: how many versions of it} in the bucket."""
    out: dict[str, int] = {}
    for info in objects(store).client.list_objects(objects(store).prefix + "packs/"):
        name = info.key.rsplit("/", 1)[1].removesuffix(".pack")
        out[name] = len(objects(store).client.versions(info.key))
    return out


def wait_past(admin: Any, bucket: S3Endpoint, epoch: int) -> None:
    """Until the bucket's own clock (the Date of its answers: what enforces a lock) has
    passed ``epoch``: a condition polled on the bucket, each HeadBucket its own pace."""
    while True:
        answer = admin.head_bucket(Bucket=bucket.bucket)
        date = parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
        if date.timestamp() > epoch:
            return


@pytest.fixture
def locked_bucket(s3_buckets: BucketFactory) -> S3Endpoint:
    return s3_buckets(object_lock=True)


def test_every_object_is_locked_and_a_locked_pack_is_never_deleted(
    tmp_path: Path, locked_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, locked_bucket)
    disk = realistic_bytes(40 * CHUNK, seed=1)
    started = time.time()
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm", {"d0": disk})
        packs = [p.name for p in store.index.packs()]
        assert len(packs) >= 2
        keys = [objects(store).key(n)[len(objects(store).prefix) :] for n in packs]
        keys += [f"snapshots/{m.snapshot_id}/manifest", f"snapshots/{m.snapshot_id}/disk-0.dmap"]
        keys += ["config.json", "keys/key"]
        for key in keys:
            held = lock_of(store, key)
            assert held is not None, f"{key} is not locked"
            assert held[0] == "GOVERNANCE" and held[1] >= started + DAY, (key, held)
        dates = store.index.locks(packs)
        assert set(dates) == set(packs) and min(dates.values()) >= started + DAY
        assert (
            snapshot_lock(store.layout.snapshot_dir(m.snapshot_id))
            == lock_of(store, f"snapshots/{m.snapshot_id}/manifest")[1]
        )  # type: ignore[index]
        # The store's own key cannot delete a locked version (no governance bypass) ...
        client = objects(store).client
        key = objects(store).key(packs[0])
        version = client.versions(key)[0].version_id
        refused = client.delete_versions([(key, version)])
        assert [(k, c) for k, _, c in refused] == [(key, "AccessDenied")]

        # ... nor can the store: a pack it would delete waits in the trash for GC; a full
        # disk under that marker is named.
        def full(name: str) -> None:
            if name == "store.locked_trash.before_fsync":
                raise OSError(errno.ENOSPC, "No space left on device")

        failpoints.install(full)
        try:
            with pytest.raises(StoreWriteError, match=f"trash marker .*{packs[0]}"):
                store.delete_packs([packs[0]])
        finally:
            failpoints.install(None)
        assert not list(store.layout.trash.glob("*.remote*"))
        assert store.delete_packs([packs[0]]) == [packs[0]]
        markers = list(store.layout.trash.glob(f"*-{packs[0]}.remote"))
        assert len(markers) == 1 and markers[0].read_text().split()[1] == str(dates[packs[0]])
        assert objects(store).stat(packs[0]) is not None
        markers[0].unlink()  # the pack is still indexed: undo the test's delete
        store.remote.forget(packs[0])  # type: ignore[union-attr]
        assert read_disk(store, m) == disk


def test_prune_keeps_a_locked_snapshot_and_gc_says_which_date_it_waits_for(
    tmp_path: Path, locked_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, locked_bucket)
    t0 = datetime.now(UTC) - timedelta(days=10)  # backup times: prune's rules see them old
    old = realistic_bytes(32 * CHUNK, seed=2)
    kept = realistic_bytes(16 * CHUNK, seed=3)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        ma = write_snapshot(store, "vm", {"d0": old}, time=t0)
        mb = write_snapshot(store, "vm", {"d0": kept}, time=t0 + timedelta(days=1))
        until = snapshot_lock(store.layout.snapshot_dir(ma.snapshot_id))
        assert until is not None
        for dry_run in (True, False):
            result = prune(store, Rules(keep_last=1), dry_run=dry_run)
            assert result.removed == []
            why = result.locked[ma.snapshot_id]
            assert (
                "object lock" in why
                and datetime.fromtimestamp(until, UTC).strftime("%Y-%m-%d %H:%M:%S") in why
            ), why
        assert {e.snapshot_id for e in store.snapshots()} == {ma.snapshot_id, mb.snapshot_id}
        # Past its date by our clock (prune's ``now``) it goes locally; the bucket keeps
        # its objects (they are still locked there) and the store says so in its log.
        later = datetime.fromtimestamp(until, UTC) + timedelta(seconds=1)
        assert prune(store, Rules(keep_last=1), now=later).removed == [ma.snapshot_id]
        a_packs = {p.name for p in store.index.packs()}
        # GC with the real clock: A's packs are retired, and wait for their dates.
        first = gc(store, GcOptions(grace=timedelta(0), young_pack_margin=timedelta(0)))
        assert first.packs_trashed >= 1 and first.trash_deleted == 0
        assert first.lock_waiting == first.packs_trashed
        text = "\n".join(first.lines())
        assert f"{first.packs_trashed} packs in the bucket wait for their object lock" in text
        retired = a_packs - {p.name for p in store.index.packs()}
        assert retired and set(pack_versions(store)) >= retired
        # GC whose clock is ahead of the bucket's: the bucket refuses, the markers stay.
        ahead = datetime.now(UTC) + timedelta(days=40)
        second = gc(store, GcOptions(now=lambda: ahead, grace=timedelta(0)))
        assert second.trash_deleted == 0 and second.lock_waiting == len(retired)
        assert len(list(store.layout.trash.glob("*.remote"))) == len(retired)
        assert set(pack_versions(store)) >= retired
        assert read_disk(store, mb) == kept
        assert check_store(store, data=True).ok


def test_renewal_then_everything_goes_once_the_dates_are_past(
    tmp_path: Path, locked_bucket: S3Endpoint, rgw_admin: Any
) -> None:
    """A short lock (4 s, generations of 1 s): a backup deduplicating against older packs
    renews them (the store's clock moved on); once every date is past by the bucket's clock,
    prune and GC delete it all, every version."""
    path = tmp_path / "store"
    init(path, locked_bucket, seconds=4)
    shared = realistic_bytes(16 * CHUNK, seed=4)
    own = realistic_bytes(16 * CHUNK, seed=5)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        ma = write_snapshot(store, "vm", {"d0": own})
        mb = write_snapshot(store, "vm-b", {"d0": shared})
        a_packs = _packs_of(store, ma)
        b_packs = _packs_of(store, mb)
        assert not a_packs & b_packs
        first = store.index.locks(b_packs)
        # A backup 4 s later by the store's clock: B's packs no longer cover it (no waiting:
        # the dates it asks for lie further in the future, which the bucket takes).
        objects(store).clock = lambda: time.time() + 4
        mc = write_snapshot(store, "vm", {"d0": shared})  # deduplicated: renews B's packs
        assert _packs_of(store, mc) == b_packs
        renewed = store.index.locks(b_packs)
        for name in b_packs:
            assert renewed[name] > first[name]
            key = objects(store).key(name)[len(objects(store).prefix) :]
            assert lock_of(store, key) == ("GOVERNANCE", renewed[name])
        # Every date of A past: prune removes it (its objects too), GC deletes its packs.
        objects(store).clock = time.time
        wait_past(
            rgw_admin, locked_bucket, snapshot_lock(store.layout.snapshot_dir(ma.snapshot_id)) or 0
        )
        wait_past(rgw_admin, locked_bucket, max(store.index.locks(a_packs).values()))
        result = prune(store, Rules(keep_last=1), vm="vm")
        assert result.removed == [ma.snapshot_id], result.locked
        assert not list(objects(store).keys(f"snapshots/{ma.snapshot_id}/"))
        done = gc(store, GcOptions(grace=timedelta(0), young_pack_margin=timedelta(0)))
        assert done.lock_waiting == 0 and done.trash_deleted >= len(a_packs), done.lines()
        assert set(pack_versions(store)) == {p.name for p in store.index.packs()} == b_packs
        assert all(n == 1 for n in pack_versions(store).values())
        assert read_disk(store, mc) == shared and read_disk(store, mb) == shared
        assert check_store(store, data=True).ok


def _packs_of(store: Store, manifest: Any) -> set[str]:
    with store.open_diskmap(manifest, manifest.disks[0]) as dm:
        ids = [cid for _, cid in dm.iter_ids() if any(cid)]
    return set(store.index.packs_of(ids).values())


def test_one_writer_at_a_time_by_versions(tmp_path: Path, locked_bucket: S3Endpoint) -> None:
    """Two DataMovers racing for one prefix: exactly one writes, the other is refused naming
    it; a reader reads meanwhile; after the close the other writes; break-lock frees a
    dead holder's claim; a killed writer's own directory takes its claim over."""
    path = tmp_path / "a"
    init(path, locked_bucket)
    disk = realistic_bytes(8 * CHUNK, seed=6)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm", {"d0": disk})
    other = tmp_path / "b"
    shutil.copytree(path, other)
    barrier = threading.Barrier(2)
    outcome: dict[str, object] = {}
    release = threading.Event()

    def open_one(where: Path) -> None:
        barrier.wait()
        try:
            with Store.open(where, passphrase=PASSPHRASE):
                outcome[where.name] = "writer"
                release.wait(60)
        except StoreLocked as e:
            outcome[where.name] = e
            release.set()

    threads = [threading.Thread(target=open_one, args=(p,)) for p in (path, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(type(v).__name__ for v in outcome.values()) == ["StoreLocked", "str"], outcome
    loser = next(v for v in outcome.values() if isinstance(v, StoreLocked))
    assert "break-lock" in str(loser)
    client_key = "st/writer.json"
    with Store.open(other, passphrase=PASSPHRASE) as store:  # both closed: free again
        assert objects(store).client.versions(client_key)[-1:]  # our claim
        with Store.open(path, passphrase=PASSPHRASE, writable=False) as reader:
            assert read_disk(reader, reader.manifest(m.snapshot_id)) == disk
        with pytest.raises(StoreLocked):
            Store.open(path, passphrase=PASSPHRASE)
    assert run_writer(path, "store.remote.after_put", 1, 7).returncode == -signal.SIGKILL
    with pytest.raises(StoreLocked):  # the killed writer's claim keeps others out ...
        Store.open(other, passphrase=PASSPHRASE)
    with Store.open(path, passphrase=PASSPHRASE) as store:  # ... its own directory takes over
        assert not store.report.problems, store.report.lines()
    assert run_writer(path, "store.remote.after_put", 1, 8).returncode == -signal.SIGKILL
    held = Store.break_bucket_lock(other)
    assert held is not None and str(path.resolve()) in held
    assert Store.break_bucket_lock(other) is None
    with Store.open(other, passphrase=PASSPHRASE) as store:
        assert read_disk(store, store.manifest(m.snapshot_id)) == disk
        assert check_store(store, data=True).ok


def test_a_killed_upload_is_deleted_once_its_date_is_past(
    tmp_path: Path, locked_bucket: S3Endpoint, rgw_admin: Any
) -> None:
    path = tmp_path / "store"
    init(path, locked_bucket, seconds=3)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        write_snapshot(store, "vm", {"d0": realistic_bytes(8 * CHUNK, seed=9)})
        indexed = {p.name for p in store.index.packs()}
    assert run_writer(path, "store.remote.after_put", 1, 7).returncode == -signal.SIGKILL
    orphans = [p for name, p in cached_packs(path).items() if name not in indexed]
    assert orphans
    for copy in orphans:  # the killed writer's local copies are lost
        copy.unlink()
    with Store.open(path, passphrase=PASSPHRASE) as store:
        gone = set(store.report.removed_uploads)
        assert {p.stem for p in orphans} <= gone, store.report.lines()
        # Locked before the kill (the lock is set as part of the upload): the bucket keeps
        # them, each waits in the trash with its date, and GC deletes them after it.
        markers = {m.stem.partition("-")[2]: m for m in store.layout.trash.glob("*.remote")}
        assert {p.stem for p in orphans} <= set(markers)
        early = gc(store, GcOptions(grace=timedelta(0), young_pack_margin=timedelta(0)))
        assert early.lock_waiting == len(markers) and early.trash_deleted == 0
        wait_past(
            rgw_admin, locked_bucket, max(int(m.read_text().split()[1]) for m in markers.values())
        )
        result = gc(store, GcOptions(grace=timedelta(0), young_pack_margin=timedelta(0)))
        assert result.lock_waiting == 0 and result.trash_deleted == len(markers), result.lines()
        assert set(pack_versions(store)) == {p.name for p in store.index.packs()}
        assert not store.index.uploads()


def test_the_locked_bucket_alone_re_attaches_lock_and_all(
    tmp_path: Path, locked_bucket: S3Endpoint
) -> None:
    path = tmp_path / "store"
    init(path, locked_bucket, mode="GOVERNANCE")
    disk = realistic_bytes(24 * CHUNK, seed=10)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm", {"d0": disk})
        until = snapshot_lock(store.layout.snapshot_dir(m.snapshot_id))
    shutil.rmtree(path)
    new = tmp_path / "attached"
    asked = RemoteConfig(locked_bucket.url, locked_bucket.bucket, "st/")  # no lock asked
    key = (locked_bucket.access_key, locked_bucket.secret_key)
    config = Store.attach(new, asked, key)
    assert config.remote is not None and config.remote.lock == LockPolicy("GOVERNANCE", DAY)
    assert snapshot_lock(new / "snapshots" / m.snapshot_id) == until
    with Store.open(new, passphrase=PASSPHRASE) as store:
        assert read_disk(store, store.manifest(m.snapshot_id)) == disk
        assert check_store(store, data=True).ok
        m2 = write_snapshot(store, "vm", {"d0": disk[: 8 * CHUNK]})
        assert lock_of(store, f"snapshots/{m2.snapshot_id}/manifest") is not None


def test_an_unfit_bucket_is_refused_saying_why(
    tmp_path: Path, s3_buckets: BucketFactory, rgw_admin: Any
) -> None:
    plain = s3_buckets()
    with pytest.raises(ObjectStoreUnfit) as e:
        init(tmp_path / "a", plain)
    assert "object lock" in str(e.value) and "created" in str(e.value)
    locked = s3_buckets(object_lock=True)
    with pytest.raises(ObjectStoreUnfit) as e:  # a store without the lock: no create-only
        Store.init(
            tmp_path / "b",
            chunk_size=CHUNK,
            pack_size=PACK,
            passphrase=PASSPHRASE,
            kdf=CHEAP_KDF,
            remote=RemoteConfig(locked.url, locked.bucket, "st/"),
            s3_key=(locked.access_key, locked.secret_key),
        )
    assert "--object-lock" in str(e.value)
    rgw_admin.put_object_lock_configuration(
        Bucket=locked.bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    with pytest.raises(ObjectStoreUnfit) as e:
        init(tmp_path / "c", locked)
    assert "default retention" in str(e.value) and "GOVERNANCE 1 days" in str(e.value)
    assert not (tmp_path / "c").exists()


def test_objects_an_attacker_deleted_are_kept_by_the_lock_and_come_back(
    tmp_path: Path, locked_bucket: S3Endpoint, rgw_admin: Any
) -> None:
    """A key that may delete (but not bypass the lock) deletes every object of the store:
    each plain DELETE only hides a locked version behind a delete marker. The next writable
    open makes them visible again and says so; nothing is dropped from the index, every
    snapshot reads back; and the bucket alone still re-attaches after the same attack."""
    path = tmp_path / "store"
    init(path, locked_bucket)
    disk = realistic_bytes(24 * CHUNK, seed=11)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm", {"d0": disk})
        packs = {p.name for p in store.index.packs()}

    def attack() -> int:
        keys = [
            o["Key"]
            for page in rgw_admin.get_paginator("list_objects_v2").paginate(
                Bucket=locked_bucket.bucket
            )
            for o in page.get("Contents", [])
        ]
        for key in keys:
            rgw_admin.delete_object(Bucket=locked_bucket.bucket, Key=key)
        return len(keys)

    assert attack() >= len(packs) + 4
    for copy in cached_packs(path).values():
        copy.unlink()  # nothing to fall back on here either
    with Store.open(path, passphrase=PASSPHRASE) as store:
        unhidden = set(store.report.unhidden)
        assert {objects(store).key(n)[len("st/") :] for n in packs} <= unhidden
        assert f"snapshots/{m.snapshot_id}/manifest" in unhidden
        assert any("kept by its object lock" in line for line in store.report.problems)
        assert not store.report.dropped_packs
        assert {p.name for p in store.index.packs()} == packs
        assert read_disk(store, m) == disk
        assert check_store(store, data=True).ok
    shutil.rmtree(path)
    attack()
    new = tmp_path / "attached"
    key = (locked_bucket.access_key, locked_bucket.secret_key)
    Store.attach(new, RemoteConfig(locked_bucket.url, locked_bucket.bucket, "st/"), key)
    with Store.open(new, passphrase=PASSPHRASE) as store:
        assert read_disk(store, store.manifest(m.snapshot_id)) == disk


def test_a_failed_renewal_leaves_the_backup_committed_and_the_next_one_renews(
    tmp_path: Path, locked_bucket: S3Endpoint
) -> None:
    """The bucket failing a PutObjectRetention after the manifest is the commit point: the
    snapshot stays committed, the dates recorded stay what the bucket holds, and the next
    commit renews what is still short."""
    path = tmp_path / "store"
    init(path, locked_bucket, seconds=4)
    shared = realistic_bytes(16 * CHUNK, seed=12)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        ma = write_snapshot(store, "vm", {"d0": shared})
        packs = _packs_of(store, ma)
        first = store.index.locks(packs)
        objects(store).clock = lambda: time.time() + 4  # the next backup must renew them

        def fail(name: str) -> None:
            if name == "store.locks.before_renew":
                raise OSError(errno.EIO, "the bucket did not answer")

        failpoints.install(fail)
        try:
            mb = write_snapshot(store, "vm", {"d0": shared})
        finally:
            failpoints.install(None)
        assert mb.snapshot_id in {e.snapshot_id for e in store.snapshots()}
        assert store.index.locks(packs) == first  # nothing renewed, nothing recorded
        for name in packs:
            key = objects(store).key(name)[len(objects(store).prefix) :]
            assert lock_of(store, key) == ("GOVERNANCE", first[name])
        mc = write_snapshot(store, "vm", {"d0": shared})
        renewed = store.index.locks(packs)
        assert all(renewed[n] > first[n] for n in packs)
        for m in (ma, mb, mc):
            assert read_disk(store, m) == shared
