"""A store whose sealed packs live in an S3 bucket: ``STORE/packs/`` is their cache (issue 18).

Everything else stays in the store directory as in a local store (config, key file, index,
catalog, snapshots, trash, journal); only sealed packs move, and the bucket also keeps a copy
of the configuration, the key file and every committed snapshot, so that it alone can be
re-attached (``attach``; the layout is below). ``config.json`` names the bucket
(``layout.RemoteConfig``: endpoint, bucket, prefix, region, cache bound, request budgets)
and ``keys/s3.json`` (0600) holds the access key and secret; neither is ever logged. One
DataMover writes a prefix at a time (the writer lock, below); request budgets:
``engine.store.budget``.

Write order — the store's rule 1, one step longer::

    records → pack sealed in packs/ (fsync, rename, fsync dir)
            → upload intent (index row ``uploads``, durable)
            → PUT create-only (If-None-Match: *)
            → index entries, intent cleared (one transaction)
            → DiskMaps → manifest

So every indexed pack is in the bucket, and a pack being uploaded is named by an intent row
until it is indexed. The local copy stays in the cache until evicted.

Reads: a record of a cached pack is read from its file. A pack not in the cache is fetched
whole (one streamed GET into ``packs/tmp/``, its size checked against the index, renamed
into place; not fsynced: ``packs/unsynced-<boot id>`` says this boot has such copies, and
the first open after an OS crash drops every cached copy of an indexed pack, which the
bucket holds): restores and repacks read a pack's records in store order, so one GET of
a pack serves all its reads, and concurrent readers of one pack wait for a single fetch.
Readers may announce the packs they will read (``prefetch``): they are fetched in the
background, two at a time.
After every upload and fetch the cache is trimmed to its bound, least recently used first,
never the pack used last: a reader with the file open reads on (unlinking an open file is
safe), and one that finds it gone fetches it again (``Store.get_record``).

Recovery (``recovery.recover`` with a cache) lists the bucket instead of ``packs/``:

- a sealed pack in the cache that is not indexed (a writer killed between seal and index, or
  a pack abandoned after a failed index commit) is uploaded — create-only, so its own earlier
  upload counts as done — and indexed, as a local store indexes it from its trailer;
- an index row whose object is missing or has another size is dropped and reported; a cached
  copy whose size differs from its row is deleted (only the cache was wrong);
- an intent whose pack is neither indexed nor in the cache (the writer was killed mid-upload
  and its local copy is gone) has its object deleted: nothing refers to it, and nothing
  is left that GC would keep forever;
- an object in the bucket that the index does not know, that no intent names and that is not
  in the trash is indexed from its trailer (one ranged GET of its tail): this is how an
  index is rebuilt from the bucket;
- with object lock, first: an object hidden by a delete marker (a plain DELETE, by mistake or
  by an attacker who cannot delete a locked version) is made visible again by removing the
  marker, and reported as a problem (``S3Packs.unhide``; ``attach`` does the same).

GC retires a pack in a bucket by a marker ``trash/<t>-<name>.remote`` (its size) instead of
a link; the object is deleted, in ``DeleteObjects`` batches, once the grace period is over.

Object lock (``--object-lock MODE --lock-for DURATION`` at init; ``engine.store.retention``
has the dates and the promise): the bucket must have been created with object lock, which
turns versioning on, and RGW 16 ignores ``If-None-Match`` in versioned buckets. So there,
create-only rests on the order of versions (``S3Packs._put_locked``: PUT, list the key's
versions, lock ours only if it is the oldest, else delete it), and so do the claim and the
writer lock (below). Every object put is locked; a commit renews the packs its snapshot
shares with older ones; a delete removes every version and is refused by the bucket while
one is locked: GC keeps the pack's trash marker (with its date) and retries, and a pack
that repair or recovery would delete gets such a marker (``leave_for_gc``).

Not yet (docs/DESIGN.md §4.1): several DataMovers writing one pool (leases in the bucket;
the writer lock refuses a second writer until then).
"""

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import structlog

from engine.core.errors import CorruptPack, PackMissing, StoreError, StoreLocked
from engine.io.s3 import S3Endpoint
from engine.store.failure import write_failure
from engine.store.index import Index
from engine.store.layout import (
    IN_BUCKET,
    MANIFEST_NAME,
    REMOTE_TRASH,
    Layout,
    RemoteConfig,
    StoreConfig,
    remote_trash,
)
from engine.store.objects import S3Packs
from engine.store.pack import PACK_SUFFIX, pack_path
from engine.util.fs import TMP_SUFFIX, atomic_write, fsync_dir

log = structlog.get_logger("tessera.store")

# Prefetching (``PackCache.prefetch``): packs fetched at once in the background, and how many
# may be under way or queued. Two GETs in flight keep RGW busy while the reader decodes the
# pack before (a 64 MiB GET takes ~0.2 s on loopback, its decode ~0.1 s per core).
PREFETCH_THREADS: Final = 2
PREFETCH_AHEAD: Final = 4
# The marker a store leaves in its bucket prefix at init: a second store is refused there.
STORE_MARKER: Final = "tessera-store.json"


# ``packs/unsynced-<boot id>``: this boot fetched copies into the cache without fsync.
UNSYNCED: Final = "unsynced-"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def write_credentials(layout: Layout, access_key: str, secret_key: str) -> None:
    """``keys/s3.json``, readable by the owner only."""
    path = layout.s3_credentials
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.dumps({"access_key": access_key, "secret_key": secret_key}).encode() + b"\n"
    atomic_write(path, doc, "store.s3_credentials")  # 0600, as every atomic_write


def endpoint(layout: Layout, remote: RemoteConfig) -> S3Endpoint:
    """The bucket's endpoint with the key from ``keys/s3.json``; StoreError naming the file
    when it is missing or unreadable (never its content)."""
    path = layout.s3_credentials
    try:
        doc = json.loads(path.read_bytes())
        access, secret = doc["access_key"], doc["secret_key"]
        if not isinstance(access, str) or not isinstance(secret, str):
            raise TypeError("access_key and secret_key must be strings")
    except FileNotFoundError:
        raise StoreError(
            path=layout.root, reason=f"the S3 key of {remote.url} is missing ({path})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"the S3 key file {path} is unreadable ({type(e).__name__})"
        raise StoreError(path=layout.root, reason=reason) from None
    return S3Endpoint(remote.endpoint, remote.bucket, access, secret, remote.region)


def claim_prefix(packs: S3Packs, store_id: str) -> None:
    """At init: leave the store's marker under the prefix, create-only; StoreError when the
    prefix already holds a store (its id named), so two stores never share one."""
    key = f"{packs.prefix}{STORE_MARKER}"
    body = json.dumps({"store_id": store_id}).encode() + b"\n"
    if packs.lock is None:
        if packs.client.put_new(key, body, len(body)) is not None:
            return
        there = _store_id(packs.client.get_range(key, 0, 4096))
    else:  # versioned: the oldest version is the claim (``S3Packs._put_locked``)
        mine = packs.client.put_version(key, body, len(body))
        oldest = [v for v in packs.client.versions(key) if not v.marker][-1]
        if oldest.version_id == mine:
            return
        there = _store_id(packs.client.get_range(key, 0, 4096, oldest.version_id))
        packs.client.delete_versions([(key, mine)])
    raise StoreError(
        path=packs.where,
        reason=f"already holds store {there or '(unreadable marker)'}: a bucket prefix holds "
        "one store (choose another prefix)",
    )


def _store_id(raw: bytes | None) -> str | None:
    try:
        found = json.loads(raw or b"{}").get("store_id")
    except (ValueError, AttributeError):
        return None
    return str(found) if found else None


# --- what else the bucket holds: enough to re-attach it alone -------------------------------
#
#   <prefix>tessera-store.json        the claim (store id), create-only at init
#   <prefix>config.json               the store's configuration (``StoreConfig``)
#   <prefix>keys/key                  the key file, sealed by the passphrase (when the store
#                                     keeps it in keys/key; one kept elsewhere stays there)
#   <prefix>snapshots/<id>/disk-N.dmap, manifest
#                                     each committed snapshot, the manifest last
#
# ``IN_BUCKET`` in the store directory says configuration and key file are there (a writer's
# open puts them otherwise). A snapshot is put after its local commit
# (``Store.commit_manifest``); ``IN_BUCKET`` in its directory says it is there, and a
# writer's open puts every committed snapshot without it (a failed or killed put). Prune
# deletes a removed snapshot's objects; undoing the removal puts them again.

CONFIG_KEY: Final = "config.json"
KEY_KEY: Final = "keys/key"
SNAPSHOTS: Final = "snapshots/"


def publish_store(packs: S3Packs, layout: Layout, key_file: Path) -> None:
    """At init, after the claim: the configuration, and the key file when the store keeps
    it (``keys/key``; a key kept elsewhere on purpose is not copied)."""
    packs.put_file(CONFIG_KEY, layout.config)
    if key_file == layout.default_key_file and key_file.exists():
        packs.put_file(KEY_KEY, key_file)
    (layout.root / IN_BUCKET).touch()  # done: a writer's open need not put them again


def store_published(layout: Layout) -> bool:
    return (layout.root / IN_BUCKET).exists()


def put_snapshot(packs: S3Packs, layout: Layout, snapshot_id: str) -> None:
    """Put a committed snapshot's DiskMaps, then its manifest, then mark it ``IN_BUCKET``;
    with object lock the marker holds the date its objects are locked until."""
    d = layout.snapshot_dir(snapshot_id)
    files = [*sorted(d.glob("*.dmap")), d / MANIFEST_NAME]
    dates = [packs.put_file(f"{SNAPSHOTS}{snapshot_id}/{f.name}", f) for f in files]
    until = max((u for u in dates if u is not None), default=None)
    atomic_write(d / IN_BUCKET, b"" if until is None else f"{until}\n".encode(), "store.in_bucket")


def drop_snapshot(packs: S3Packs, snapshot_id: str) -> None:
    """Delete a removed snapshot's objects, the manifest first."""
    keys = sorted(
        packs.keys(f"{SNAPSHOTS}{snapshot_id}/"), key=lambda k: not k.endswith("/manifest")
    )
    for key in keys:  # one by one: the manifest gone first, never DiskMaps without it
        packs.delete_keys([key])


def unsent_snapshots(layout: Layout) -> list[str]:
    """Committed snapshots not marked ``IN_BUCKET`` (their put failed or was killed)."""
    return sorted(
        s for s in layout.committed_snapshots() if not (layout.snapshot_dir(s) / IN_BUCKET).exists()
    )


def attach(path: Path, remote: RemoteConfig, s3_key: tuple[str, str]) -> StoreConfig:
    """Make ``path`` (absent or empty) a store on the bucket prefix another DataMover wrote:
    its configuration, key file (when the bucket has it) and committed snapshots come from
    the bucket; the index and catalog are rebuilt by the first writable open (from the packs'
    trailers and the manifests). Returns the configuration. StoreError when the prefix holds
    no store."""
    if path.exists() and any(path.iterdir()):
        raise StoreError(path=path, reason="exists and is not empty")
    access, secret = s3_key
    packs = S3Packs.open(  # only read here (the first writable open probes it)
        S3Endpoint(remote.endpoint, remote.bucket, access, secret, remote.region),
        remote.prefix,
        probe=False,
    )
    layout = Layout(path)
    staging = path.with_name(path.name + ".attaching")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tmp = Layout(staging)
        if packs.client.versioning() == "Enabled":  # object lock: nothing hidden is left out
            for key in packs.unhide():
                log.warning("store.attach_unhidden", where=packs.where, key=key)
        if not packs.get_file(CONFIG_KEY, tmp.config):
            raise StoreError(path=packs.where, reason="holds no Tessera store (no config.json)")
        config = StoreConfig.load(staging)
        (staging / "keys").mkdir()
        packs.get_file(KEY_KEY, tmp.default_key_file)
        for d in (tmp.packs, tmp.packs / "tmp", tmp.snapshots):
            d.mkdir(parents=True, exist_ok=True)
        for key in packs.keys(SNAPSHOTS):
            sid, _, name = key[len(SNAPSHOTS) :].partition("/")
            target = tmp.snapshot_dir(sid)
            target.mkdir(exist_ok=True)
            packs.get_file(key, target / name)
        was = config.remote
        if was is not None:  # the bucket's object lock is the store's, whatever was asked
            remote = dataclasses.replace(
                remote, object_lock=was.object_lock, lock_seconds=was.lock_seconds
            )
        for sid in tmp.committed_snapshots():
            until = None
            if remote.lock is not None:  # the date prune waits for: the manifest's
                held = packs.client.retention(f"{packs.prefix}{SNAPSHOTS}{sid}/{MANIFEST_NAME}")
                until = None if held is None else int(held.until.timestamp())
            marker = b"" if until is None else f"{until}\n".encode()
            atomic_write(tmp.snapshot_dir(sid) / IN_BUCKET, marker, "store.attach")
        (staging / IN_BUCKET).touch()
        for d in tmp.snapshots.iterdir():  # DiskMaps of a snapshot whose manifest is gone
            if not (d / MANIFEST_NAME).exists():
                shutil.rmtree(d)
        write_credentials(tmp, access, secret)
        config = dataclasses.replace(config, remote=remote)
        atomic_write(tmp.config, config.dump(), "store.attach")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.rmdir()
        os.rename(staging, path)  # the attach's commit point: all of it, or nothing
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-attached stays
        raise
    finally:
        packs.close()
    log.info("store.attached", store=str(layout.root), where=remote.url, store_id=config.store_id)
    return config


# --- the writer lock in the bucket -----------------------------------------------------------
#
# One DataMover writes a bucket prefix at a time (its GC deletes objects another writer's
# index might name). A writable open takes ``<prefix>writer.json`` create-only (in a
# versioned bucket: as a new version, the oldest version holding it): who (host,
# machine id, store directory, pid) and since when; close deletes it. Found held by this
# same store directory on this same machine, it is left by a writer of ours that was killed
# (the local flock proves no other process here holds the store): taken over. Held by any
# other, the open is refused naming the holder; ``tessera store break-lock`` removes it
# once an operator knows that DataMover is gone. Never taken over on a timer: a paused or
# partitioned writer that comes back must not find a second writer in its store.

WRITER_LOCK: Final = "writer.json"


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def writer_identity(layout: Layout) -> dict[str, str]:
    return {
        "host": socket.gethostname(),
        "machine": _machine_id(),
        "store": str(layout.root.resolve()),
    }


def describe_holder(doc: dict[str, object]) -> str:
    return (
        f"the DataMover {doc.get('host', '?')} (store directory {doc.get('store', '?')}, "
        f"pid {doc.get('pid', '?')}, since {doc.get('since', '?')})"
    )


def _parse_lock(raw: bytes | None) -> dict[str, object] | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"host": "(unreadable lock)"}
    return doc if isinstance(doc, dict) else {"host": "(unreadable lock)"}


def _lock_versions(packs: S3Packs) -> list[str]:
    """In a versioned bucket: the writer lock's versions, newest first. Each is a writer's
    claim; the oldest holds the lock (a claim is deleted for good when its writer lets go)."""
    key = packs.prefix + WRITER_LOCK
    return [v.version_id for v in packs.client.versions(key) if not v.marker]


def read_writer_lock(packs: S3Packs) -> dict[str, object] | None:
    key = packs.prefix + WRITER_LOCK
    if packs.lock is None:
        return _parse_lock(packs.client.get_range(key, 0, 64 * 1024))
    held = _lock_versions(packs)
    return _parse_lock(packs.client.get_range(key, 0, 64 * 1024, held[-1])) if held else None


def take_writer_lock(packs: S3Packs, layout: Layout) -> str | None:
    """Hold the bucket prefix's writer lock (above); StoreLocked naming the holder. Returns
    the version id of our claim in a versioned bucket (object lock), for the release.

    A versioned bucket (RGW 16 ignores ``If-None-Match`` there) settles it by versions:
    each writer PUTs its claim as a new version of ``writer.json`` and then lists the
    versions; the oldest is the holder, and every contender sees the same oldest. A loser
    deletes its own version; the holder's is deleted (for good, by id) when it lets go. A
    contender killed between its PUT and its delete leaves a claim that holds the lock once
    the holder lets go: the refusal names it, and ``tessera store break-lock`` removes it."""
    me = writer_identity(layout)
    doc = {**me, "pid": os.getpid(), "since": datetime.now(UTC).isoformat(timespec="seconds")}
    body = json.dumps(doc).encode() + b"\n"
    key = packs.prefix + WRITER_LOCK
    if packs.lock is not None:
        return _take_versioned(packs, key, body, me)
    if packs.client.put_new(key, body, len(body)) is not None:
        return None
    held = read_writer_lock(packs)
    if held is not None and all(held.get(k) == v for k, v in me.items()):
        log.warning("store.bucket_lock_taken_over", where=packs.where, was=describe_holder(held))
        packs.client.put(key, body)
        return None
    raise _locked(packs, held)


def _take_versioned(packs: S3Packs, key: str, body: bytes, me: dict[str, str]) -> str:
    mine = packs.client.put_version(key, body, len(body))
    try:
        while True:
            held = _lock_versions(packs)
            if held and held[-1] == mine:
                return mine
            holder = held[-1] if held else None
            doc = _parse_lock(packs.client.get_range(key, 0, 64 * 1024, holder))
            if holder is None or doc is None or not all(doc.get(k) == v for k, v in me.items()):
                raise _locked(packs, doc)
            # A claim of this store directory on this machine: its process is gone (the
            # store's own file lock is ours), so it is taken over.
            log.warning("store.bucket_lock_taken_over", where=packs.where, was=describe_holder(doc))
            packs.client.delete_versions([(key, holder)])
    except BaseException:
        with contextlib.suppress(StoreError):
            packs.client.delete_versions([(key, mine)])
        raise


def _locked(packs: S3Packs, held: dict[str, object] | None) -> StoreLocked:
    return StoreLocked(
        path=packs.where,
        reason=f"is written by {describe_holder(held or {})}; one DataMover writes a bucket "
        "prefix at a time. If that DataMover is gone for good, `tessera store break-lock` "
        "this store",
    )


def release_writer_lock(packs: S3Packs, layout: Layout, version: str | None = None) -> None:
    """Delete the lock if it is still ours (best effort: a close must not fail on it);
    ``version``: our claim in a versioned bucket (``take_writer_lock``)."""
    try:
        if version is not None:
            packs.client.delete_versions([(packs.prefix + WRITER_LOCK, version)])
            return
        held = read_writer_lock(packs)
        me = writer_identity(layout)
        if held is not None and all(held.get(k) == v for k, v in me.items()):
            packs.delete_keys([WRITER_LOCK])
    except (StoreError, OSError) as e:
        log.warning("store.bucket_lock_not_released", where=packs.where, error=str(e))


def break_writer_lock(packs: S3Packs) -> dict[str, object] | None:
    """Remove the prefix's writer lock whoever holds it; what it said, or None. In a
    versioned bucket every claim goes (the holder's and any a killed contender left)."""
    held = read_writer_lock(packs)
    if packs.lock is not None:
        key = packs.prefix + WRITER_LOCK
        packs.client.delete_versions([(key, v) for v in _lock_versions(packs)])
    elif held is not None:
        packs.delete_keys([WRITER_LOCK])
    return held


def leave_for_gc(layout: Layout, index: Index, objects: S3Packs, names: list[str]) -> None:
    """Packs the bucket would not delete yet (object lock): a GC trash marker each, with its
    size and date (recorded, else asked of the bucket: a writer killed before it recorded
    it), so GC deletes it once the date is past (``engine.maint.gc``)."""
    layout.trash.mkdir(exist_ok=True)
    stamp = int(time.time())
    dates = index.locks(names)
    for name in names:
        if name not in dates and (held := objects.client.retention(objects.key(name))):
            dates[name] = int(held.until.timestamp())
        size = index.pack_size(name) or 0
        marker = layout.trash / f"{stamp}-{name}{REMOTE_TRASH}"
        try:
            atomic_write(marker, remote_trash(size, dates.get(name)), "store.locked_trash")
        except OSError as e:  # named; the pack stays in the bucket, retried by the caller
            raise write_failure(layout.root, f"trash marker {marker.name}", e) from e
        log.info("store.pack_left_locked", pack=name, until=dates.get(name), where=str(layout.root))
    fsync_dir(layout.trash)


class InitBucket:
    """The bucket of a store being created (``Store.init``): probed and claimed first, then
    given the key file's copy and the configuration once the local store exists."""

    def __init__(self, packs: S3Packs):
        self.packs = packs

    @classmethod
    def claim(cls, remote: RemoteConfig, s3_key: tuple[str, str], store_id: str) -> "InitBucket":
        access, secret = s3_key
        where = S3Endpoint(remote.endpoint, remote.bucket, access, secret, remote.region)
        packs = S3Packs.open(where, remote.prefix, lock=remote.lock)
        try:
            claim_prefix(packs, store_id)
        except BaseException:
            packs.close()
            raise
        return cls(packs)

    def write_credentials(self, layout: Layout, access_key: str, secret_key: str) -> None:
        write_credentials(layout, access_key, secret_key)

    def publish(self, layout: Layout, key_file: Path) -> None:
        publish_store(self.packs, layout, key_file)

    def close(self) -> None:
        self.packs.close()


class PackCache:
    """``packs/`` as a bounded cache of the packs in ``objects``. Thread-safe."""

    def __init__(
        self,
        packs_dir: Path,
        objects: S3Packs,
        limit: int,
        pack_size: int,
        lock: Layout | None = None,
        lock_version: str | None = None,
    ):
        """``lock``: the writer's store layout, whose writer lock in the bucket this cache
        holds (released on close; ``lock_version``: its claim in a versioned bucket); None
        for a read-only open."""
        self.packs_dir = packs_dir
        self.objects = objects
        self._lock_layout = lock
        self._lock_version = lock_version
        # Never less than two packs: the one a reader uses and the one just fetched.
        self.limit = max(limit, 2 * pack_size)
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # cached packs, least recent first
        self._fetching: dict[str, Future[Path]] = {}
        # Background fetches of packs a reader announced (``prefetch``): a few at a time,
        # never more than the cache holds beside the pack in use.
        self._prefetcher = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
        self._ahead: dict[str, int] = {}  # being prefetched: name → size
        self._wanted: deque[tuple[str, int]] = deque()  # announced, not started yet
        self._unread: dict[str, int] = {}  # prefetched, not asked for by a reader yet
        self.prefetched = 0
        self.fetches = 0
        self.evictions = 0
        self._boot = _boot_id()  # None: unknown, so every fetched copy is fsynced
        self._marked = False
        cached = []
        for path in packs_dir.glob(f"??/*{PACK_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                cached.append((st.st_mtime, path.stem, st.st_size))
        for _, name, size in sorted(cached):
            self._lru[name] = size

    @property
    def where(self) -> str:
        return self.objects.where

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._lru.values())

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self._lock_layout is not None:
            release_writer_lock(self.objects, self._lock_layout, self._lock_version)
            self._lock_layout = None
        if self.objects.budget is not None:
            self.objects.budget.flush()
        self.objects.close()

    # --- writing ---------------------------------------------------------------------------

    def upload(self, name: str) -> int | None:
        """Put the sealed pack ``packs/nn/<name>.pack`` into the bucket (create-only; the
        same content already there is success). The caller recorded the intent first. Its
        lock date with object lock (``engine.store.retention``), else None."""
        return self.objects.put(name, pack_path(self.packs_dir, name))

    def added(self, name: str, size: int) -> None:
        """A pack sealed here was uploaded and indexed: cache it, trim the cache."""
        with self._lock:
            self._lru[name] = size
            self._lru.move_to_end(name)
        self.trim()

    def forget(self, name: str) -> None:
        """GC retired or repair quarantined the pack: drop its cached copy, if any."""
        with self._lock:
            self._lru.pop(name, None)
            self._unread.pop(name, None)
        pack_path(self.packs_dir, name).unlink(missing_ok=True)

    # --- reading ---------------------------------------------------------------------------

    # --- copies fetched without fsync -------------------------------------------------------

    def _note_unsynced(self) -> None:
        """Before the first unsynced copy of this process: ``packs/unsynced-<boot id>``,
        durable, so the first open after an OS crash knows this boot's copies may be torn."""
        if self._boot is None or self._marked:
            return
        with self._lock:
            if self._marked:
                return
            marker = self.packs_dir / f"{UNSYNCED}{self._boot}"
            if not marker.exists():
                atomic_write(marker, b"", "store.cache_unsynced")
            self._marked = True

    def drop_after_reboot(self, indexed: Callable[[str], bool]) -> list[str]:
        """After an OS crash (a marker of another boot): drop every cached copy of an
        ``indexed`` pack (it is in the bucket, fetched again when needed), since one fetched
        without fsync may be torn. Copies of packs not indexed yet were sealed here and
        fsynced: recovery needs them, they stay. Returns the names dropped."""
        stale = [
            m for m in self.packs_dir.glob(f"{UNSYNCED}*") if m.name != f"{UNSYNCED}{self._boot}"
        ]
        if not stale:
            return []
        with self._lock:
            dropped = [n for n in self._lru if indexed(n)]
            for name in dropped:
                self._lru.pop(name, None)
                pack_path(self.packs_dir, name).unlink(missing_ok=True)
        for marker in stale:
            marker.unlink(missing_ok=True)
        fsync_dir(self.packs_dir)
        log.info("store.cache_dropped_after_reboot", where=self.where, packs=len(dropped))
        return dropped

    def cached(self, name: str) -> Path | None:
        """The path of pack ``name`` if the cache holds it (marked used), else None."""
        with self._lock:
            if name not in self._lru:
                return None
            self._unread.pop(name, None)
            self._lru.move_to_end(name)
        return pack_path(self.packs_dir, name)

    def local(self, name: str, size: int) -> Path:
        """The path of pack ``name`` in the cache, fetched first when it is not there (one
        fetch for concurrent callers). ``size``: its size by the index, checked. Raises
        ``PackMissing`` / ``ObjectStoreError`` naming the bucket, ``CorruptPack`` when the
        object's size differs from the index's."""
        path = pack_path(self.packs_dir, name)
        with self._lock:
            self._unread.pop(name, None)
            if name in self._lru and path.exists():
                self._lru.move_to_end(name)
                return path
            fut = self._fetching.get(name)
            leader = fut is None
            if fut is None:
                fut = self._fetching[name] = Future()
        if not leader:
            return fut.result()
        self._lead(name, size, path, fut, ahead=False)
        return path

    def _lead(self, name: str, size: int, path: Path, fut: "Future[Path]", ahead: bool) -> None:
        """Fetch for every caller waiting on ``fut`` (registered in ``_fetching``); a
        prefetch (``ahead``) leaves the pack counted unread until a reader asks for it."""
        try:
            self._fetch(name, size, path)
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(path)
            if ahead:
                with self._lock:
                    self._unread[name] = size
                    self.prefetched += 1
        finally:
            with self._lock:
                del self._fetching[name]
        self.trim()

    def _fetch(self, name: str, size: int, path: Path) -> None:
        # Unique: a read-only open (verify) may fetch the same pack beside the writer.
        tmp = self.packs_dir / "tmp" / f"{name}{PACK_SUFFIX}.get-{secrets.token_hex(4)}{TMP_SUFFIX}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tmp.open("wb") as f:
                got = self.objects.fetch(name, f)
                f.flush()
                # A cached copy is read as the pack itself: never a torn one after a crash.
                # Not fsynced (12 % of a cold restore, measured) where the boot is known:
                # only an OS crash tears it, and the first open after one drops every copy
                # fetched before (``drop_after_reboot``).
                if self._boot is None:
                    os.fsync(f.fileno())
            if got != size:
                raise CorruptPack(
                    pack=name,
                    reason=f"{self.where} holds {got} bytes of it, the index says {size}",
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            self._note_unsynced()
            os.rename(tmp, path)
        except OSError as e:  # the cache's disk (full, failing): named, never a bare errno
            tmp.unlink(missing_ok=True)
            store = self.packs_dir.parent
            raise write_failure(store, f"the cached copy of pack {name}", e, size) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._lru[name] = size
            self._lru.move_to_end(name)
            self.fetches += 1
        log.debug("store.pack_fetched", where=self.where, pack=name, bytes=size)

    def prefetch(self, packs: list[tuple[str, int]]) -> None:
        """Queue (name, size) packs to fetch in the background, in order: at most
        ``PREFETCH_AHEAD`` under way, never more bytes than the cache holds beside the pack
        in use (a prefetched pack must not evict one not read yet). Each finished prefetch
        starts the next. Never blocks nor raises (a failed prefetch is logged; the reader's
        own fetch says what is wrong)."""
        with self._lock:
            queued = {n for n, _ in self._wanted}
            for name, size in packs:
                if name not in queued and name not in self._ahead:
                    self._wanted.append((name, size))
                    queued.add(name)
            todo = self._pump_locked()
        for name, size in todo:
            self._prefetcher.submit(self._prefetch_one, name, size)

    def _pump_locked(self) -> list[tuple[str, int]]:
        held = sum(self._ahead.values()) + sum(self._unread.values())
        room = self.limit - max(self._lru.values(), default=0) - held
        todo = []
        while self._wanted and len(self._ahead) < PREFETCH_AHEAD:
            name, size = self._wanted[0]
            if name in self._lru or name in self._fetching:
                self._wanted.popleft()
                continue
            if size > room:
                break
            self._wanted.popleft()
            room -= size
            self._ahead[name] = size
            todo.append((name, size))
        return todo

    def _prefetch_one(self, name: str, size: int) -> None:
        try:
            self._fetch_ahead(name, size)
        except Exception as e:  # noqa: BLE001 - a hint: the reader's fetch reports it
            log.info("store.prefetch_failed", where=self.where, pack=name, error=str(e))
        finally:
            with self._lock:
                self._ahead.pop(name, None)
                todo = self._pump_locked()
        for next_name, next_size in todo:
            with contextlib.suppress(RuntimeError):  # shut down: the store is closing
                self._prefetcher.submit(self._prefetch_one, next_name, next_size)

    def _fetch_ahead(self, name: str, size: int) -> None:
        """``local`` for the prefetcher: the pack counts as unread until a reader asks."""
        path = pack_path(self.packs_dir, name)
        with self._lock:
            if name in self._lru or name in self._fetching:
                return
            fut: Future[Path] = Future()
            self._fetching[name] = fut
        self._lead(name, size, path, fut, ahead=True)

    def trim(self) -> None:
        """Evict least recently used packs until the cache fits its bound (never the last)."""
        while True:
            with self._lock:
                if len(self._lru) <= 1 or sum(self._lru.values()) <= self.limit:
                    return
                name, _ = self._lru.popitem(last=False)
                self._unread.pop(name, None)
                self.evictions += 1
            pack_path(self.packs_dir, name).unlink(missing_ok=True)

    def missing(self, name: str) -> PackMissing:
        return PackMissing(pack=name, where=self.where)
