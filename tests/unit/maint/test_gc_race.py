"""GC racing a backup: every GC step × every backup step, forced with failpoints.

The backup deduplicates against a chunk that only a pruned (expired) snapshot referenced —
the chunk GC is about to condemn and delete — writes a new chunk and references a live one
in a pack GC repacks. GC pauses at a chosen step (its thread blocks in the failpoint) while
the backup runs its remaining steps, or the backup runs its first steps before GC starts.
Whatever the interleaving, every committed snapshot must read back exactly and the store
must verify clean, also after a final GC with no session live.

The same race runs on a store whose packs live in a bucket of a real Ceph RGW
(``engine.store.remote``; a copy of the template's bucket per case), for every GC step with
the backup paused after its ``has`` and after its ``put``: GC then retires packs by trash
markers and repacks through the cache, and uploads its new packs before indexing them. And
again in a bucket with object lock (``engine.store.retention``): what the race writes is
locked, so GC must keep the markers of the packs the bucket refuses to delete.
"""

import json
import random
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.core.ids import ZERO_ID, ChunkId
from engine.maint.check import check_store
from engine.maint.gc import GcOptions, GcResult, gc
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.diskmap import DiskMapWriter
from engine.store.layout import RemoteConfig
from engine.store.manifest import Manifest
from engine.store.snapshot import SnapshotWriter
from engine.util import failpoints
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk
from tests.s3.rgw import BucketFactory, Rgw, empty_and_remove_bucket

CHUNK = 64 * 1024
NOW = datetime.now(UTC) + timedelta(days=8)  # every pruned snapshot is past its grace
GC_POINTS = [
    "gc.listed",
    "gc.marked",
    "gc.condemned",
    "gc.stamped",
    "gc.deleted",
    "gc.repack.sealed",
    "gc.retire.linked",
    "gc.retire.committed",
    "gc.retire.unlinked",
    "end",  # GC runs to completion in the middle of the backup
]
BACKUP_STEPS = 5  # begin (lease), has(garbage), put, set slots, commit


def data(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CHUNK) for _ in range(n)]


A1, A2, NEW = data(24, 1), data(24, 2), data(1, 3)[0]


def snapshot(store: Store, vm: str, chunks: list[bytes], when: datetime) -> Manifest:
    with store.begin_snapshot(vm_id=vm, vm_name=vm, level="full", time=when) as snap:
        dm = snap.add_disk("d", "d", len(chunks) * CHUNK)
        for slot, c in enumerate(chunks):
            dm.set(slot, store.put_chunk(c))
        return snap.commit()


def run_gc(store: Store) -> GcResult:
    return gc(
        store,
        GcOptions(now=lambda: NOW, repack_threshold=0.75, young_pack_margin=timedelta(0)),
    )


def build_template(
    path: Path, remote: RemoteConfig | None = None, key: tuple[str, str] | None = None
) -> None:
    """A1's garbage condemned (deferred by a lease), A2 pruned and past its grace."""
    Store.init(
        path,
        chunk_size=CHUNK,
        pack_size=1024 * 1024,
        passphrase=PASSPHRASE,
        kdf=CHEAP_KDF,
        remote=remote,
        s3_key=key,
    )
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        snapshot(store, "a1", A1, t0)
        snapshot(store, "a1", A1[::2], t0 + timedelta(days=1))
        prune(store, Rules(keep_last=1), vm="a1")
        with store.lease("test", "defers the deletion of A1's garbage"):
            first = run_gc(store)
        assert first.condemned == 12 and first.deleted_chunks == 0
        snapshot(store, "vm", A2, t0)
        snapshot(store, "vm", A2[::2], t0 + timedelta(days=1))
        prune(store, Rules(keep_last=1), vm="vm")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gc-race") / "store"
    build_template(path)
    return path


@pytest.fixture(scope="module")
def s3_template(
    tmp_path_factory: pytest.TempPathFactory, rgw: Rgw, rgw_admin: Any
) -> Iterator[tuple[Path, str]]:
    """The template with its packs in a bucket of its own: (store directory, bucket)."""
    bucket = "t-" + secrets.token_hex(8)
    rgw_admin.create_bucket(Bucket=bucket)
    try:
        path = tmp_path_factory.mktemp("gc-race-s3") / "store"
        build_template(path, RemoteConfig(rgw.url, bucket, "st/"), (rgw.access_key, rgw.secret_key))
        yield path, bucket
    finally:
        empty_and_remove_bucket(rgw_admin, bucket)


class Pause:
    """A failpoint handler that blocks the GC thread at ``point`` until released."""

    def __init__(self, point: str):
        self.point = point
        self.reached = threading.Event()
        self.release = threading.Event()
        self.gc_thread: threading.Thread | None = None

    def __call__(self, name: str) -> None:
        if (
            name == self.point
            and threading.current_thread() is self.gc_thread
            and not self.reached.is_set()
        ):
            self.reached.set()
            self.release.wait()


@dataclass
class Backup:
    """The backup under test, one step at a time."""

    store: Store
    snap: SnapshotWriter | None = None
    dm: DiskMapWriter | None = None
    found: bool | None = None
    manifest: Manifest | None = None
    ids: dict[str, ChunkId] = field(default_factory=dict)

    def steps(self) -> list[Callable[[], None]]:
        return [self.begin, self.has, self.put, self.set, self.commit]

    def begin(self) -> None:
        self.snap = self.store.begin_snapshot(vm_id="new", vm_name="new", level="full")
        self.dm = self.snap.add_disk("d", "d", 3 * CHUNK)

    def has(self) -> None:
        self.ids["garbage"] = self.store.codec.chunk_id(A2[1])  # only pruned A2 had it
        self.found = self.store.has(self.ids["garbage"])

    def put(self) -> None:
        if not self.found:  # what the pipeline does when has() said no
            self.store.put(self.ids["garbage"], self.store.codec.encode(A2[1], self.ids["garbage"]))
        self.ids["new"] = self.store.put_chunk(NEW)
        self.ids["live"] = self.store.put_chunk(A1[0])  # live, in a pack GC repacks

    def set(self) -> None:
        assert self.dm is not None
        for slot, key in enumerate(("garbage", "new", "live")):
            self.dm.set(slot, self.ids[key])

    def commit(self) -> None:
        assert self.snap is not None
        self.manifest = self.snap.commit()


def expected_new() -> bytes:
    return A2[1] + NEW + A1[0]


@pytest.fixture
def store_copy(template: Path, tmp_path: Path) -> Iterator[Store]:
    path = tmp_path / "store"
    shutil.copytree(template, path)
    store = Store.open(path, passphrase=PASSPHRASE)
    try:
        yield store
    finally:
        failpoints.install(None)
        store.close()


@pytest.fixture(params=["plain", "locked"])
def s3_store_copy(
    request: pytest.FixtureRequest,
    s3_template: tuple[Path, str],
    s3_buckets: BucketFactory,
    rgw_admin: Any,
    tmp_path: Path,
) -> Iterator[Store]:
    """A copy of the S3 template: its directory, and its bucket's objects (server-side).
    ``locked``: into a bucket with object lock, the store locking what it writes for a day
    (the template's copies are not locked: GC deletes those and must keep the new ones)."""
    template, source = s3_template
    locked = request.param == "locked"
    target = s3_buckets(object_lock=locked).bucket
    for page in rgw_admin.get_paginator("list_objects_v2").paginate(Bucket=source):
        for o in page.get("Contents", []):
            rgw_admin.copy_object(
                Bucket=target, Key=o["Key"], CopySource={"Bucket": source, "Key": o["Key"]}
            )
    path = tmp_path / "store"
    shutil.copytree(template, path)
    config = json.loads((path / "config.json").read_bytes())
    config["remote"]["bucket"] = target
    if locked:
        config["remote"].update(object_lock="GOVERNANCE", lock_seconds=86400)
    (path / "config.json").write_text(json.dumps(config))
    store = Store.open(path, passphrase=PASSPHRASE)
    try:
        yield store
    finally:
        failpoints.install(None)
        store.close()


@pytest.mark.parametrize("step", range(BACKUP_STEPS))
@pytest.mark.parametrize("point", GC_POINTS)
def test_gc_never_loses_a_referenced_chunk(store_copy: Store, point: str, step: int) -> None:
    race(store_copy, point, step)


@pytest.mark.integration
@pytest.mark.parametrize("step", [2, 3])  # GC starts after the backup's has(); after its put()
@pytest.mark.parametrize("point", GC_POINTS)
def test_gc_never_loses_a_referenced_chunk_in_a_bucket(
    s3_store_copy: Store, point: str, step: int
) -> None:
    store = s3_store_copy
    race(store, point, step)
    assert store.remote is not None
    objects = {p.name for p in store.remote.objects.list()}
    indexed = {p.name for p in store.index.packs()}
    assert indexed <= objects, "every indexed pack is in the bucket"
    assert objects <= indexed | set(store.layout.trash_files()), "no object GC forgot"
    assert not store.index.uploads()


def race(store: Store, point: str, step: int) -> None:
    kept = [store.manifest(e.snapshot_id) for e in store.snapshots()]
    backup = Backup(store)
    steps = backup.steps()
    for s in steps[:step]:
        s()

    pause = Pause(point)
    outcome: list[GcResult | BaseException] = []

    def collect() -> None:
        try:
            outcome.append(run_gc(store))
        except BaseException as e:
            outcome.append(e)

    gc_thread = threading.Thread(target=collect, name="gc")
    pause.gc_thread = gc_thread
    failpoints.install(pause)
    gc_thread.start()
    if point == "end":
        gc_thread.join()
    else:
        while not pause.reached.wait(0.01):
            assert gc_thread.is_alive(), f"GC ended without reaching {point}: {outcome}"
        for m in kept:  # readers meanwhile: every committed snapshot reads back
            read_disk(store, m)
    for s in steps[step:]:
        s()
    pause.release.set()
    gc_thread.join()
    failpoints.install(None)
    assert isinstance(outcome[0], GcResult), outcome

    assert backup.manifest is not None
    assert read_disk(store, backup.manifest) == expected_new()
    assert check_store(store, data=True).ok
    final = run_gc(store)  # no session live: everything deferrable is deleted now
    assert final.deferred_chunks == 0
    assert read_disk(store, backup.manifest) == expected_new()
    for m in kept:
        read_disk(store, m)
    assert check_store(store, data=True).ok
    assert store.has(backup.ids["garbage"])
    # every chunk left is referenced by a snapshot
    referenced: set[bytes] = set()
    for e in store.snapshots():
        m = store.manifest(e.snapshot_id)
        for disk in m.disks:
            with store.open_diskmap(m, disk) as dm:
                referenced |= {cid for _, cid in dm.iter_ids() if cid != ZERO_ID}
    assert {cid for cid, _ in store.index.iter_chunks()} == referenced
