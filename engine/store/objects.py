"""Where sealed packs live: ``PackObjects``, a local directory or an S3 bucket (issue 18).

A sealed pack is an immutable object named by its pack name (32 hex digits). Its users put
it once, read byte ranges of it (a record; the trailer and footer), stat it, list all packs
and delete retired ones in batches::

    PackObjects     put (create-only)  read (range),  stat  list  delete (batch)  counters
                                       read_into,
                                       read_tail,
                                       fetch (whole)
    ------------    -----------------  -------------  ----  ----  --------------  ---------
    LocalPacks      link(2) into        pread          stat  glob  unlink + fsync  per call,
                    packs/nn/ (EEXIST)                             dir             per pack
    S3Packs         one PutObject,      GET Range      HEAD  List  DeleteObjects   per HTTP
                    If-None-Match: *    (bytes=-N)           V2    (≤ 1000 keys)   request

``read_trailer`` reads a pack's trailer through any of them (one request for packs of up to
~1360 records).

Invariants:

1. A pack is never overwritten. ``put`` of a name that exists with other content raises
   ``PackExists`` and the first content stays. With the same content it succeeds: a retried
   S3 PUT whose first attempt was stored (and whose answer was lost) finds its own pack, and
   so does a writer that re-uploads after a crash. On S3 this rests on RGW's conditional
   create (``If-None-Match: *``) of a single PUT, never on a HEAD first (a race) nor on a
   multipart upload (RGW 16 ignores the condition on CompleteMultipartUpload: packs of tens
   of MiB fit one PUT, up to 5 GiB).
2. ``read`` returns the bytes asked for, fewer only where the pack ends sooner; a pack that
   is not there raises ``PackMissing`` naming it and where it was looked for.
3. ``delete`` of a name that is not there is not an error (GC may retry a batch).
4. Every request is counted by kind (``put``, ``get``, ``head``, ``list``, ``delete``,
   ``other``) with the payload bytes it moved: on S3 each HTTP request sent, retries and
   probes included, because that is what request budgets and bills count.
5. An S3 bucket is probed at open for writing (``S3Packs.open``; a reader checks only that
   the bucket exists): a create-only PUT of a probe object
   succeeds and a second one is refused, a ranged GET returns just the range, and the probe
   is removed (every version of it, in a versioned bucket). A bucket that fails any of it
   is refused with ``ObjectStoreUnfit`` naming the endpoint, the bucket and the capability.
   Object lock and versioning are detected and reported (``Capabilities``). Ceph RGW 16
   ignores ``If-None-Match: *`` in a versioned bucket (measured: the second PUT makes a new
   current version), and object lock turns versioning on: a store without object lock is
   refused there (the error says ``--object-lock`` works). ``S3Packs(lock=...)`` (a store
   with object lock) requires the bucket's object lock with no default retention, and
   probes that versions list newest first; its ``put`` is create-only by versions and
   locks the pack (``_put_locked``), its ``delete`` removes every version and returns the
   packs the bucket refused (still locked): a locked pack is never deleted.

Keys on S3 mirror the directory: ``<prefix>packs/<nn>/<name>.pack``. What the store keeps
beside packs (index, catalog, snapshots) is not here: see docs/DESIGN.md §4.1 for the plan.

Every method may block (file or network I/O); the store calls them from executor threads.
Both implementations are thread-safe.
"""

import builtins
import errno
import hashlib
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final, Protocol

import structlog

from engine.core.errors import (
    CorruptPack,
    ObjectStoreError,
    ObjectStoreUnfit,
    PackExists,
    PackMissing,
)
from engine.io.s3 import Lock, S3Client, S3Endpoint
from engine.store import format as fmt
from engine.store.budget import RequestBudget
from engine.store.pack import (
    PACK_SUFFIX,
    PackEntry,
    check_header,
    pack_path,
    parse_footer,
    parse_trailer,
)
from engine.store.retention import LockPolicy
from engine.util.fs import TMP_SUFFIX, fsync_dir

log = structlog.get_logger("tessera.store")

KINDS: Final = ("put", "get", "head", "list", "delete", "other")
# S3 operations by the kind they are counted as (everything else: "other").
_S3_KINDS: Final = {
    "PutObject": "put",
    "GetObject": "get",
    "HeadObject": "head",
    "ListObjectsV2": "list",
    "DeleteObjects": "delete",
    "DeleteObject": "delete",
    "ListObjectVersions": "list",
    "PutObjectRetention": "other",
}
_NAME: Final = re.compile(r"[0-9a-f]{32}")
PROBE_PREFIX: Final = "probe/"  # under the store's prefix; probe objects live for one open
# How much of a pack's end ``read_trailer`` asks for at once: the trailer of up to ~1360
# records (48 bytes each) and the footer, so one GET for packs of 1 MiB chunks. RGW answers
# bodies of a few bytes ~45 ms late and 64 KiB in 1.4-3 ms (docs/DESIGN.md §4.1): asking for
# less would be slower, not faster.
TAIL_READ: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class KindCount:
    requests: int
    bytes: int


class RequestCounters:
    """Requests and payload bytes by kind (``KINDS``), thread-safe; read with ``snapshot``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = dict.fromkeys(KINDS, 0)
        self._bytes = dict.fromkeys(KINDS, 0)

    def request(self, kind: str) -> None:
        with self._lock:
            self._requests[kind] += 1

    def moved(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[kind] += nbytes

    def snapshot(self) -> dict[str, KindCount]:
        with self._lock:
            return {k: KindCount(self._requests[k], self._bytes[k]) for k in KINDS}


@dataclass(frozen=True, slots=True)
class PackStat:
    name: str
    size: int


class PackObjects(Protocol):
    """Where sealed packs live. Names are pack names (``pack.new_pack_name``)."""

    @property
    def where(self) -> str:
        """Where the packs are, for messages (a directory; ``s3://bucket/prefix`` at URL)."""
        ...

    @property
    def counters(self) -> RequestCounters: ...

    def put(self, name: str, source: Path) -> int | None:
        """Store the sealed pack file ``source`` (complete and fsynced; the caller may delete
        it afterwards) as ``name``, create-only. Raises ``PackExists`` when ``name`` holds
        other content; the same content is success (a retry). Its object lock date (epoch
        seconds) in a bucket with object lock (``engine.store.retention``), else None."""
        ...

    def read(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer where the pack ends); ``PackMissing``."""
        ...

    def read_into(self, name: str, offset: int, out: memoryview) -> int:
        """``read`` into ``out`` (no copy, no allocation per record): the bytes read, fewer
        only where the pack ends; ``PackMissing``."""
        ...

    def read_tail(self, name: str, length: int) -> tuple[int, bytes]:
        """(pack size, its last ``length`` bytes or all of it if shorter): one request, for
        trailers (``read_trailer``); ``PackMissing``."""
        ...

    def fetch(self, name: str, out: IO[bytes]) -> int:
        """Copy the whole pack into the file ``out`` (the store's cache), a block at a time;
        the bytes copied. ``PackMissing``."""
        ...

    def stat(self, name: str) -> PackStat | None:
        """The pack's size, or None if it is not there."""
        ...

    def list(self) -> Iterator[PackStat]:
        """Every pack, a bounded page at a time (no whole listing in memory)."""
        ...

    def delete(self, names: Iterable[str]) -> builtins.list[str]:
        """Delete packs, in batches; names that are not there are not an error. The names
        left because a version of them is still locked (object lock), else []."""
        ...

    def close(self) -> None: ...


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a pack name: {name!r}")


def _same_file_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and _file_md5(a) == _file_md5(b)


def _copy(src: IO[bytes], out: IO[bytes]) -> int:
    n = 0
    while block := src.read(4 * 1024 * 1024):
        out.write(block)
        n += len(block)
    return n


def _file_md5(path: Path) -> str:
    # MD5 because a single PUT's ETag is the MD5 of its body; not used for security.
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(4 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


class LocalPacks:
    """Packs as files under ``packs_dir`` (``STORE/packs``): today's layout."""

    def __init__(self, packs_dir: Path):
        self.packs_dir = packs_dir
        self._counters = RequestCounters()

    @property
    def where(self) -> str:
        return str(self.packs_dir)

    @property
    def counters(self) -> RequestCounters:
        return self._counters

    def put(self, name: str, source: Path) -> int | None:
        _check_name(name)
        final = pack_path(self.packs_dir, name)
        self._counters.request("put")
        final.parent.mkdir(parents=True, exist_ok=True)
        size = source.stat().st_size
        # link(2) fails with EEXIST rather than replace: create-only and atomic. A source on
        # another filesystem is copied to a temporary file beside the pack first.
        tmp: Path | None = None
        try:
            try:
                os.link(source, final)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                tmp = self.packs_dir / "tmp" / (name + PACK_SUFFIX + ".put" + TMP_SUFFIX)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                with source.open("rb") as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 4 * 1024 * 1024)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.link(tmp, final)
        except FileExistsError:
            if not _same_file_content(source, final):
                raise PackExists(pack=name, where=self.where) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        self._counters.moved("put", size)
        return None

    def read(self, name: str, offset: int, length: int) -> bytes:
        _check_name(name)
        self._counters.request("get")
        try:
            fd = os.open(pack_path(self.packs_dir, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PackMissing(pack=name, where=self.where) from None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        self._counters.moved("get", len(data))
        return data

    def read_into(self, name: str, offset: int, out: memoryview) -> int:
        _check_name(name)
        self._counters.request("get")
        try:
            fd = os.open(pack_path(self.packs_dir, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PackMissing(pack=name, where=self.where) from None
        try:
            n = os.preadv(fd, [out], offset)
        finally:
            os.close(fd)
        self._counters.moved("get", n)
        return n

    def read_tail(self, name: str, length: int) -> tuple[int, bytes]:
        _check_name(name)
        self._counters.request("get")
        try:
            fd = os.open(pack_path(self.packs_dir, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PackMissing(pack=name, where=self.where) from None
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - length)
            data = os.pread(fd, size - start, start)
        finally:
            os.close(fd)
        self._counters.moved("get", len(data))
        return size, data

    def fetch(self, name: str, out: IO[bytes]) -> int:
        _check_name(name)
        self._counters.request("get")
        try:
            with pack_path(self.packs_dir, name).open("rb") as f:
                n = _copy(f, out)
        except FileNotFoundError:
            raise PackMissing(pack=name, where=self.where) from None
        self._counters.moved("get", n)
        return n

    def stat(self, name: str) -> PackStat | None:
        _check_name(name)
        self._counters.request("head")
        try:
            return PackStat(name, pack_path(self.packs_dir, name).stat().st_size)
        except FileNotFoundError:
            return None

    def list(self) -> Iterator[PackStat]:
        self._counters.request("list")
        for path in sorted(self.packs_dir.glob(f"??/*{PACK_SUFFIX}")):
            if _NAME.fullmatch(path.stem):
                try:
                    yield PackStat(path.stem, path.stat().st_size)
                except FileNotFoundError:  # deleted while listing
                    continue

    def delete(self, names: Iterable[str]) -> builtins.list[str]:
        shards: set[Path] = set()
        for name in names:
            _check_name(name)
            self._counters.request("delete")
            path = pack_path(self.packs_dir, name)
            path.unlink(missing_ok=True)
            shards.add(path.parent)
        for shard in shards:
            if shard.exists():
                fsync_dir(shard)
        return []

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Capabilities:
    """What probing found in a bucket (``S3Packs.open``)."""

    conditional_create: bool  # If-None-Match: * on a single PUT refuses an existing key
    ranged_get: bool  # GET with Range returns 206 and just those bytes
    # Object lock on the bucket: None, or its default retention as S3 states it
    # ("COMPLIANCE 30 days", "GOVERNANCE 1 years", "enabled, no default retention").
    object_lock: str | None
    versioning: str | None  # "Enabled", "Suspended", or None (never turned on)


class S3Packs:
    """Packs as objects ``<prefix>packs/<nn>/<name>.pack`` in one S3 bucket.

    Make it with ``open`` (which probes the bucket); the caller closes it."""

    def __init__(
        self,
        endpoint: S3Endpoint,
        prefix: str,
        capabilities: Capabilities | None,
        budget: RequestBudget | None = None,
        lock: LockPolicy | None = None,
    ):
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.endpoint = endpoint
        self.prefix = prefix
        self.lock = lock  # object lock: every object put is locked (``engine.store.retention``)
        # The clock lock dates are reckoned from (tests move it; the bucket keeps its own).
        self.clock: Callable[[], float] = time.time
        self.capabilities = capabilities
        self.budget = budget
        self._counters = RequestCounters()
        self.client = S3Client(endpoint, on_send=self._sent)

    def _sent(self, operation: str) -> None:
        self._counters.request(_S3_KINDS.get(operation, "other"))
        if self.budget is not None:
            self.budget.sent()  # may wait for a token: requests per second

    def _admit(self) -> None:
        if self.budget is not None:
            self.budget.admit()  # BudgetSpent: the month's requests are spent

    @classmethod
    def open(
        cls,
        endpoint: S3Endpoint,
        prefix: str = "",
        budget: RequestBudget | None = None,
        probe: bool = True,
        lock: LockPolicy | None = None,
    ) -> "S3Packs":
        """Open a bucket for packs after probing it; raises ``ObjectStoreUnfit`` naming the
        endpoint, bucket and missing capability (or ``ObjectStoreError`` if it fails), and
        ``BudgetSpent`` when ``budget`` (requests per second and month) allows no more.
        ``probe`` False (a reader, which never puts): only that the bucket exists is
        checked, one request instead of seven; ``capabilities`` stays None. ``lock``: the
        store locks what it puts, so the bucket must have object lock (and no default
        retention: the store dates each object itself), and is versioned."""
        packs = cls(endpoint, prefix, None, budget, lock)
        try:
            packs._admit()
            if probe:
                packs.capabilities = packs._probe()
            elif not packs.client.bucket_exists():
                raise packs._unfit("bucket", "it does not exist (or this key cannot see it)")
        except BaseException:
            packs.close()
            raise
        found = packs.capabilities.object_lock if packs.capabilities else "(not probed)"
        log.info("store.s3_opened", where=packs.where, object_lock=found)
        return packs

    def _unfit(self, capability: str, reason: str) -> ObjectStoreUnfit:
        return ObjectStoreUnfit(
            endpoint=self.endpoint.url,
            bucket=self.endpoint.bucket,
            capability=capability,
            reason=reason,
        )

    def _probe(self) -> Capabilities:
        if not self.client.bucket_exists():
            raise self._unfit("bucket", "it does not exist (or this key cannot see it)")
        conf = self.client.object_lock()
        lock = _describe_lock(conf)
        versioning = self.client.versioning()
        if self.lock is not None:
            return self._probe_locked(conf, lock, versioning)
        key = f"{self.prefix}{PROBE_PREFIX}{secrets.token_hex(16)}"
        first = b"tessera capability probe: create-only PUT, ranged GET"
        try:
            if self.client.put_new(key, first, len(first)) is None:
                raise self._unfit("conditional create", f"a new random key {key} exists")
            if self.client.put_new(key, b"second", 6) is not None:
                why = "a second create-only PUT of one key was accepted: packs could be replaced"
                if versioning == "Enabled":
                    # Measured on RGW 16.2.15: If-None-Match: * holds in plain and
                    # suspended-versioning buckets, and is ignored once versioning is on.
                    why += (
                        " (the bucket is versioned; Ceph RGW 16 ignores If-None-Match: * in "
                        "versioned buckets"
                        + (f"; object lock: {lock}, which turns versioning on" if lock else "")
                        + "; a store made with --object-lock works in such a bucket)"
                    )
                raise self._unfit("conditional create (If-None-Match: * on PutObject)", why)
            got = self.client.get_range(key, 8, 10)
            if got != first[8:18]:
                raise self._unfit("ranged GET", f"bytes 8..18 of the probe came back as {got!r}")
        finally:
            self._remove_probe(key, versioned=versioning is not None)
        return Capabilities(True, True, lock, versioning)

    def _probe_locked(
        self, conf: dict[str, object] | None, lock: str | None, versioning: str | None
    ) -> Capabilities:
        """A store with object lock: the bucket must have it enabled (S3 allows that only
        when the bucket is created) with no default retention (the store dates each object
        itself, and its lock and probe objects must be deletable); the probe's versions
        must list oldest last and a ranged GET must return just the range."""
        if lock is None:
            raise self._unfit(
                "object lock",
                "the bucket has none, and S3 enables it only when a bucket is created: "
                "create one with object lock (e.g. `aws s3api create-bucket "
                "--object-lock-enabled-for-bucket`)",
            )
        rule = conf.get("Rule") if conf else None
        if rule:
            raise self._unfit(
                "object lock without a default retention",
                f"the bucket has a default retention ({lock}); Tessera dates each object "
                "itself and keeps its lock objects deletable: remove the bucket's default "
                "retention rule",
            )
        if versioning != "Enabled":
            raise self._unfit("versioning", f"object lock is on but versioning is {versioning}")
        key = f"{self.prefix}{PROBE_PREFIX}{secrets.token_hex(16)}"
        first = b"tessera capability probe: versions, ranged GET"
        try:
            one = self.client.put_version(key, first, len(first))
            two = self.client.put_version(key, b"second", 6)
            order = [v.version_id for v in self.client.versions(key) if not v.marker]
            if order != [two, one]:
                raise self._unfit(
                    "version listing", f"two versions of {key} listed as {order}, not newest first"
                )
            got = self.client.get_range(key, 8, 10, version_id=one)
            if got != first[8:18]:
                raise self._unfit("ranged GET", f"bytes 8..18 of the probe came back as {got!r}")
        finally:
            self._remove_probe(key, versioned=True)
        return Capabilities(False, True, lock, versioning)

    def _remove_probe(self, key: str, versioned: bool) -> None:
        if not versioned:
            self.client.delete([key])
            return
        # In a versioned bucket (object lock turns versioning on) a delete only adds a
        # marker: remove each version. A bucket with a default retention locks the probe
        # too: it stays (a few bytes under probe/) until its date, and we say so.
        try:
            self.client.delete_versions([(key, v.version_id) for v in self.client.versions(key)])
        except ObjectStoreError as e:
            log.warning("store.s3_probe_kept", where=self.where, key=key, error=str(e))

    @property
    def where(self) -> str:
        return f"s3://{self.endpoint.bucket}/{self.prefix} at {self.endpoint.url}"

    @property
    def counters(self) -> RequestCounters:
        return self._counters

    def key(self, name: str) -> str:
        _check_name(name)
        return f"{self.prefix}packs/{name[:2]}/{name}{PACK_SUFFIX}"

    def put(self, name: str, source: Path) -> int | None:
        """Put a sealed pack (create-only, as invariant 1); its lock date (epoch seconds)
        in a store with object lock, else None."""
        self._admit()
        key = self.key(name)
        size = source.stat().st_size
        if self.lock is not None:
            return self._put_locked(name, key, source, size)
        with source.open("rb") as f:
            etag = self.client.put_new(key, f, size)
        self._counters.moved("put", size)
        if etag is not None:
            return None
        # The key exists: our own earlier attempt (a retry whose first answer was lost, a
        # re-upload after a crash) or another pack. A single PUT's ETag is its body's MD5.
        there = self.client.head(key)
        if there is None or there.size != size or there.etag != _file_md5(source):
            raise PackExists(pack=name, where=self.where)
        return None

    def _put_locked(self, name: str, key: str, source: Path, size: int) -> int:
        """Create-only in a versioned bucket, where RGW 16 ignores ``If-None-Match``: PUT,
        list the key's versions, and only then lock ours — or delete it. Ours being the
        oldest, the name was new: it gets its retention (by version id; nothing refers to
        the pack before it is indexed, so the moment it is unlocked harms nothing). An older
        version means the name existed: ours is deleted (it is not locked yet, so it can
        be, and readers get the first content again); the same size and MD5 is our own
        earlier attempt (success), other content ``PackExists``. Three requests per pack
        instead of one: still ~1/40 of one object per chunk at our pack size."""
        assert self.lock is not None
        with source.open("rb") as f:
            mine = self.client.put_version(key, f, size)
        self._counters.moved("put", size)
        self._admit()
        versions = [v for v in self.client.versions(key) if not v.marker]
        oldest = versions[-1] if versions else None
        if oldest is None or oldest.version_id == mine:
            until = self.lock.date(self.clock())
            self._admit()
            self.client.retain(key, Lock(self.lock.mode, _dt(until)), mine)
            return until
        self._admit()
        self.client.delete_versions([(key, mine)])
        if oldest.size != size or oldest.etag != _file_md5(source):
            raise PackExists(pack=name, where=self.where)
        self._admit()
        there = self.client.retention(key, oldest.version_id)
        if there is not None:
            return int(there.until.timestamp())
        until = self.lock.date(self.clock())  # our attempt, killed before its lock: lock it now
        self._admit()
        self.client.retain(key, Lock(self.lock.mode, _dt(until)), oldest.version_id)
        return until

    def read(self, name: str, offset: int, length: int) -> bytes:
        self._admit()
        data = self.client.get_range(self.key(name), offset, length)
        if data is None:
            raise PackMissing(pack=name, where=self.where)
        self._counters.moved("get", len(data))
        return data

    def read_into(self, name: str, offset: int, out: memoryview) -> int:
        self._admit()
        n = self.client.get_range_into(self.key(name), offset, out)
        if n is None:
            raise PackMissing(pack=name, where=self.where)
        self._counters.moved("get", n)
        return n

    def read_tail(self, name: str, length: int) -> tuple[int, bytes]:
        self._admit()
        got = self.client.get_tail(self.key(name), length)
        if got is None:
            raise PackMissing(pack=name, where=self.where)
        self._counters.moved("get", len(got[1]))
        return got

    def fetch(self, name: str, out: IO[bytes]) -> int:
        self._admit()
        n = self.client.get_to(self.key(name), out)
        if n is None:
            raise PackMissing(pack=name, where=self.where)
        self._counters.moved("get", n)
        return n

    def stat(self, name: str) -> PackStat | None:
        self._admit()
        info = self.client.head(self.key(name))
        return None if info is None else PackStat(name, info.size)

    def list(self) -> Iterator[PackStat]:
        self._admit()
        base = f"{self.prefix}packs/"
        for info in self.client.list_objects(base):
            shard, _, leaf = info.key[len(base) :].partition("/")
            name = leaf.removesuffix(PACK_SUFFIX)
            if leaf.endswith(PACK_SUFFIX) and _NAME.fullmatch(name) and shard == name[:2]:
                yield PackStat(name, info.size)

    def delete(self, names: Iterable[str]) -> builtins.list[str]:
        """Delete packs in batches; the names the bucket refused because a version of them
        is still locked (object lock: every version is deleted, the rest of a refused
        pack's versions too, so it is retried whole)."""
        self._admit()
        keys = {self.key(n): n for n in names}
        if not keys:
            return []
        if self.lock is None:
            self.client.delete([*keys])
            return []
        return sorted({keys[k] for k in self._delete_versions(keys)})

    def _delete_versions(self, keys: Iterable[str]) -> set[str]:
        """Every version and delete marker of ``keys`` (one listing per key), in batches;
        the keys with a version the bucket refused (still locked)."""
        pairs = []
        for key in keys:
            self._admit()
            pairs += [(key, v.version_id) for v in self.client.versions(key)]
        self._admit()
        refused = self.client.delete_versions(pairs)
        for key, version, code in refused:
            log.info(
                "store.s3_delete_refused", where=self.where, key=key, version=version, code=code
            )
        return {key for key, _, _ in refused}

    def unhide(self) -> builtins.list[str]:
        """In a versioned bucket (object lock): remove the delete markers that hide objects
        under the prefix (a plain DELETE — a mistake, or an attacker without the power to
        delete a locked version — only adds a marker; removing it makes the version current
        again). The keys made visible again, relative to the prefix."""
        self._admit()
        hidden = self.client.hidden(self.prefix)
        pairs = [(key, m) for key, ms in hidden.items() for m in ms]
        if pairs:
            self._admit()
            refused = self.client.delete_versions(pairs)
            if refused:
                key, _, code = refused[0]
                raise ObjectStoreError(
                    endpoint=self.endpoint.url,
                    bucket=self.endpoint.bucket,
                    key=key,
                    op="DeleteObjects",
                    code=code,
                    reason=f"a delete marker hiding it could not be removed ({len(refused)} "
                    "refused)",
                )
        return [k[len(self.prefix) :] for k in hidden]

    def retain(self, name: str, until: int) -> None:
        """Move pack ``name``'s lock date to ``until`` (object lock; only ever later)."""
        assert self.lock is not None
        self._admit()
        self.client.retain(self.key(name), Lock(self.lock.mode, _dt(until)))

    def retain_key(self, key: str, until: int) -> None:
        """``retain`` for ``<prefix><key>`` (the configuration, the key file)."""
        assert self.lock is not None
        self._admit()
        self.client.retain(self.prefix + key, Lock(self.lock.mode, _dt(until)))

    # --- the store's other objects (``engine.store.remote``): keys relative to the prefix --

    def put_file(self, key: str, source: Path) -> int | None:
        """Store a file as ``<prefix><key>``, create-only: a key already there is left as
        is (these objects never change once written: a retry finds its own). Its lock date
        with object lock (a HEAD first: one writer holds the prefix, so no race), else None."""
        self._admit()
        if self.lock is not None:
            there = self.client.retention(self.prefix + key)
            if there is not None:
                return int(there.until.timestamp())
            self._admit()
            until = self.lock.date(self.clock())
            with source.open("rb") as f:
                lock = Lock(self.lock.mode, _dt(until))
                self.client.put_version(self.prefix + key, f, source.stat().st_size, lock)
            return until
        with source.open("rb") as f:
            self.client.put_new(self.prefix + key, f, source.stat().st_size)
        return None

    def get_file(self, key: str, dest: Path) -> bool:
        """Copy ``<prefix><key>`` into the new file ``dest``; False if it does not exist."""
        self._admit()
        with dest.open("xb") as f:
            got = self.client.get_to(self.prefix + key, f)
        if got is None:
            dest.unlink()
            return False
        return True

    def keys(self, under: str) -> Iterator[str]:
        """Keys under ``<prefix><under>``, relative to the prefix, a page at a time."""
        self._admit()
        for info in self.client.list_objects(self.prefix + under):
            yield info.key[len(self.prefix) :]

    def delete_keys(self, keys: Iterable[str]) -> None:
        """Delete ``<prefix><key>`` objects (every version, with object lock); raises
        ``ObjectStoreError`` naming a key the bucket refused (still locked)."""
        self._admit()
        full = [self.prefix + k for k in keys]
        if self.lock is None:
            self.client.delete(full)
            return
        refused = sorted(self._delete_versions(full))
        if refused:
            raise ObjectStoreError(
                endpoint=self.endpoint.url,
                bucket=self.endpoint.bucket,
                key=refused[0],
                op="DeleteObjects",
                code="AccessDenied",
                reason=f"still locked ({len(refused)} of {len(full)} keys refused)",
            )

    def close(self) -> None:
        self.client.close()


def read_trailer(packs: PackObjects, name: str) -> tuple[int, list[PackEntry]]:
    """A sealed pack's (size, trailer entries) read through ``packs``, as
    ``pack.read_trailer`` reads a file: one ranged GET of the pack's last ``TAIL_READ``
    bytes, and a second only for a trailer longer than that. The header is checked when the
    tail holds it (a pack smaller than ``TAIL_READ``); in a larger pack the trailer's CRC and
    record offsets are what is checked, without a third request per pack. Raises
    ``CorruptPack`` or ``PackMissing`` naming the pack."""
    size, tail = packs.read_tail(name, TAIL_READ)
    if len(tail) == size and size >= fmt.PACK_HEADER.size:
        check_header(name, tail[: fmt.PACK_HEADER.size])
    count, crc, trailer_offset = parse_footer(name, size, tail[-fmt.PACK_FOOTER.size :])
    start = size - len(tail)
    if trailer_offset < start:
        tail = packs.read(name, trailer_offset, start - trailer_offset) + tail
        start = trailer_offset
    trailer = tail[trailer_offset - start : size - start - fmt.PACK_FOOTER.size]
    if len(trailer) != count * fmt.TRAILER_ENTRY.size:
        raise CorruptPack(pack=name, reason="trailer read short (pack truncated or changed)")
    return size, parse_trailer(name, trailer, crc, trailer_offset)


def _dt(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _describe_lock(conf: dict[str, object] | None) -> str | None:
    if conf is None:
        return None
    rule = conf.get("Rule")
    retention = rule.get("DefaultRetention") if isinstance(rule, dict) else None
    if not isinstance(retention, dict):
        return "enabled, no default retention"
    mode = retention.get("Mode", "?")
    if "Days" in retention:
        return f"{mode} {retention['Days']} days"
    return f"{mode} {retention.get('Years', '?')} years"
