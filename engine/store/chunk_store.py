"""``Store``: the chunk store facade — init, open (= recover), has/put/get, snapshots.

Thread-safe: the async engine calls it from executor threads. Appends are serialised by one
lock; a full pack is sealed by a background thread (fsync is I/O wait, and CPU workers keep
encoding meanwhile) and its records stay readable while it seals. ``flush()`` returns once
every record put so far is in a sealed pack whose index entries are durable — the first half
of the commit order (see ``SnapshotWriter.commit``).
"""

import contextlib
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from engine.core.errors import (
    ChunkMissing,
    CorruptRecord,
    EngineError,
    SnapshotNotFound,
    StoreError,
    StoreWriteError,
)
from engine.core.ids import ZERO_ID, ChunkId, short
from engine.store import dbfiles, locks
from engine.store import format as fmt
from engine.store import manifest as manifest_mod
from engine.store.catalog import Catalog, CatalogEntry
from engine.store.codec import Codec, parse_header
from engine.store.damage import clear_healed
from engine.store.diskmap import DiskMap
from engine.store.failure import is_write_failure, write_failure
from engine.store.index import Index, Location
from engine.store.keys import KdfParams, StoreKeys, read_key_file, write_key_file
from engine.store.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PACK_SIZE,
    DEFAULT_ZSTD_LEVEL,
    ENCRYPTION_AES,
    ENCRYPTIONS,
    IN_BUCKET,
    MIN_PACK_SIZE,
    STORE_FORMAT,
    Layout,
    RemoteConfig,
    StoreConfig,
    check_zstd_level,
)
from engine.store.leases import Lease, LeaseRegistry
from engine.store.manifest import DiskEntry, Manifest
from engine.store.pack import PackEntry, PackWriter, SealedPack, pack_path, read_trailer
from engine.store.recovery import RecoveryReport, index_packs, index_remote, recover
from engine.store.retention import LockPolicy, describe_duration
from engine.store.scan import Decode
from engine.store.snapshot import SnapshotWriter
from engine.util import failpoints
from engine.util.fs import atomic_write, fsync_dir

if TYPE_CHECKING:
    from engine.store.protocols import BackupStore, ChunkReader, ChunkWriter
    from engine.store.remote import InitBucket, PackCache

log = structlog.get_logger("tessera.store")


@dataclass(frozen=True)
class StoreInfo:
    path: str
    format: int
    store_id: str
    chunk_size: int
    encryption: str
    pack_size: int
    zstd_level: int
    packs: int
    chunks: int
    unique_bytes: int  # plaintext bytes of all stored chunks
    stored_bytes: int  # bytes of their records
    pack_bytes: int  # bytes of pack files (records + headers + trailers)
    snapshots: int
    logical_bytes: int  # data bytes referenced by all snapshots
    # Where sealed packs live when not in the store's packs/: "s3://bucket/prefix at URL
    # (cache N bytes)"; None for a local store.
    packs_in: str | None = None

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0


def validate_chunk_size(chunk_size: int) -> None:
    if not fmt.MIN_CHUNK_SIZE <= chunk_size <= fmt.MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise StoreError(
            path="(new)",
            reason=f"chunk size {chunk_size} must be a power of two between "
            f"{fmt.MIN_CHUNK_SIZE} and {fmt.MAX_CHUNK_SIZE}",
        )


@dataclass
class _Pending:
    writer: PackWriter
    offset: int
    length: int


class Store:
    """An open chunk store. Use ``Store.init`` then ``Store.open``; close when done."""

    def __init__(
        self,
        layout: Layout,
        config: StoreConfig,
        keys: StoreKeys,
        writable: bool,
        lock: locks.WriterLock | None,
        caches: Path | None = None,
        remote: "PackCache | None" = None,
    ):
        """``caches``: a directory holding temporary ``index.db`` / ``catalog.db`` built by a
        read-only open because the store's own are missing or damaged (see ``dbfiles``);
        removed on close. ``remote``: where sealed packs live when they live in a bucket
        (``engine.store.remote``); closed with the store."""
        self.path = layout.root
        self.layout = layout
        self.config = config
        self.keys = keys
        self.writable = writable
        self._lock_file = lock
        self.codec = Codec(keys, config.zstd_level)
        self._caches = caches
        self.remote = remote
        index = caches / "index.db" if caches and (caches / "index.db").exists() else None
        catalog = caches / "catalog.db" if caches and (caches / "catalog.db").exists() else None
        self.index = Index(index or layout.index, readonly=not writable)
        self.catalog = Catalog(catalog or layout.catalog, readonly=not writable)
        # Missing or damaged SQLite files, by file name: a read-only open works on temporary
        # copies and verify reports these; a writable open rebuilt them (``report.files``).
        self.db_problems: dict[str, str] = {}
        self.report = RecoveryReport()
        self.leases = LeaseRegistry()
        self._wlock = threading.Lock()
        self._open: PackWriter | None = None
        self._pending: dict[bytes, _Pending] = {}
        # One sealer: a local seal is an fsync, and a second would only queue behind it. In a
        # bucket two, so one pack's PUT overlaps the next one's seal and PUT.
        sealers = 1 if remote is None else 2
        self._sealer = ThreadPoolExecutor(max_workers=sealers, thread_name_prefix="pack-sealer")
        self._sealing: list[Future[None]] = []
        self._abandoned = 0  # packs given up after a failed write (``_abandon_locked``)
        # Index additions: every start and end counted (``_index_changes``) and how many are
        # under way; per thread the last id ``has`` found absent with the count it saw: ``put``
        # of that id skips its own index lookup when the count is unchanged and no addition
        # runs (``_absent_still``). Additions may overlap (two sealers, a replication
        # receiver's ``add_sealed_pack``).
        self._index_changes = 0
        self._additions_running = 0
        self._absent = threading.local()
        self._last_abandoned: StoreWriteError | None = None
        self._catalog_stale = False  # a manifest was committed but catalog.add failed
        self._closed = False

    # --- creation and opening --------------------------------------------------------------

    @staticmethod
    def init(
        path: Path,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        encryption: str = ENCRYPTION_AES,
        pack_size: int = DEFAULT_PACK_SIZE,
        key_file: Path | None = None,
        passphrase: bytes | None = None,
        kdf: KdfParams | None = None,
        keys: StoreKeys | None = None,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        remote: RemoteConfig | None = None,
        s3_key: tuple[str, str] | None = None,
    ) -> StoreConfig:
        """Create a new store at ``path`` (which must be absent or an empty directory).

        ``keys``: another store's keys instead of new ones — sites that replicate share them
        (a replica given keys without a data key is *encrypted-only*: it checks CRCs, stores
        and serves records, but cannot read them). ``zstd_level``: what new records are
        compressed with (``MIN_ZSTD_LEVEL``..``MAX_ZSTD_LEVEL``; the store docstring gives
        the measured trade-off). ``remote``: keep sealed packs in that S3 bucket
        (``engine.store.remote``) with ``s3_key`` (access key, secret); the bucket is
        probed and the prefix claimed (refused when it holds a store) before anything is
        written here."""
        validate_chunk_size(chunk_size)
        check_zstd_level(zstd_level, path)
        if encryption not in ENCRYPTIONS:
            raise StoreError(path=path, reason=f"unknown encryption {encryption!r}")
        if pack_size < MIN_PACK_SIZE:
            raise StoreError(path=path, reason=f"pack size must be at least {MIN_PACK_SIZE}")
        if path.exists() and any(path.iterdir()):
            raise StoreError(path=path, reason="exists and is not empty")
        if remote is not None and s3_key is None:
            raise StoreError(path=path, reason=f"packs in {remote.url} need an S3 key")
        layout = Layout(path)
        config = StoreConfig(
            format=STORE_FORMAT,
            store_id=secrets.token_hex(16),
            chunk_size=chunk_size,
            encryption=encryption,
            pack_size=pack_size,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            zstd_level=zstd_level,
            remote=remote,
        )
        if keys is None:
            keys = StoreKeys.generate(encrypted=encryption == ENCRYPTION_AES)
        with contextlib.ExitStack() as stack:
            bucket = None
            if remote is not None:  # probed and claimed before anything is written here
                assert s3_key is not None
                bucket = stack.enter_context(_claimed_bucket(config, remote, s3_key))
            path.mkdir(parents=True, exist_ok=True)
            for d in (layout.packs, layout.packs / "tmp", layout.snapshots):
                d.mkdir(exist_ok=True)
            key_path = key_file or layout.default_key_file
            write_key_file(key_path, keys, config.store_id, passphrase, kdf)
            if bucket is not None:
                assert s3_key is not None
                bucket.write_credentials(layout, *s3_key)
            Index(layout.index).close()
            Catalog(layout.catalog).close()
            atomic_write(layout.config, config.dump(), "store.init")  # written last: it exists
            fsync_dir(path.parent)
            if bucket is not None:
                bucket.publish(layout, key_path)
        return config

    @staticmethod
    def break_bucket_lock(path: Path) -> str | None:
        """Remove the writer lock of the bucket prefix a store's packs live in, whoever
        holds it (``remote``: for an operator who knows that DataMover is gone); who held
        it, or None. StoreError for a store whose packs are not in a bucket."""
        from engine.store.objects import S3Packs  # noqa: PLC0415 - botocore
        from engine.store.remote import break_writer_lock, describe_holder, endpoint  # noqa: PLC0415

        layout = Layout(path)
        config = StoreConfig.load(path)
        if config.remote is None:
            raise StoreError(path=path, reason="keeps its packs here: it has no bucket lock")
        where = endpoint(layout, config.remote)
        packs = S3Packs.open(where, config.remote.prefix, lock=config.remote.lock)
        try:
            held = break_writer_lock(packs)
        finally:
            packs.close()
        return None if held is None else describe_holder(held)

    @staticmethod
    def attach(path: Path, remote: RemoteConfig, s3_key: tuple[str, str]) -> StoreConfig:
        """Make ``path`` a store on a bucket prefix that holds one (``remote.attach``): the
        bucket alone suffices; the first writable open rebuilds the index and catalog."""
        from engine.store.remote import attach  # noqa: PLC0415 - botocore: only for a bucket

        return attach(path, remote, s3_key)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        passphrase: bytes | None = None,
        key_file: Path | None = None,
        writable: bool = True,
    ) -> "Store":
        """Open a store; a writable open takes the writer lock and recovers (see recovery),
        including a missing or damaged index or catalog (``dbfiles``). Raises StoreError —
        naming the file and the errno or SQLite condition — when the store cannot be opened
        (a full disk among others)."""
        layout = Layout(path)
        config = StoreConfig.load(path)
        keys = read_key_file(key_file or layout.default_key_file, config.store_id, passphrase)
        lock = locks.WriterLock(path) if writable else None
        caches: Path | None = None
        remote: PackCache | None = None
        try:
            if config.remote is not None:
                remote = _open_remote(layout, config, config.remote, writable)
            with dbfiles.os_errors(path), dbfiles.sqlite_errors(layout.index):
                problems = _db_problems(layout)
                if writable:
                    files = _set_aside(layout, problems)
                elif problems:
                    caches = Path(tempfile.mkdtemp(prefix="tessera-caches-"))
                    for name in problems:  # empty, so __init__ opens them; filled below
                        (Index if name == layout.index.name else Catalog)(caches / name).close()
                store = cls(layout, config, keys, writable, lock, caches, remote)
                store.db_problems = {} if writable else problems  # writable: rebuilt
                if remote is not None:  # after an OS crash, before anything reads the cache
                    remote.drop_after_reboot(lambda n: store.index.pack_size(n) is not None)
                if writable:
                    store.report = recover(
                        layout,
                        store.index,
                        store.catalog,
                        store.manifest,
                        store._decode(),
                        store.remote,
                    )
                    store.report.files = files
                    if store.report.indexed_packs:  # they may have healed bad chunks
                        store._clear_marks()
                elif caches is not None:
                    store._build_caches(caches)
        except BaseException:
            if remote is not None:
                remote.close()
            if lock is not None:
                lock.release()
            if caches is not None:
                shutil.rmtree(caches, ignore_errors=True)
            raise
        return store

    def _decode(self) -> Decode | None:
        """The full record check (AEAD, re-hash) when this store can run it, else None
        (an encrypted-only replica checks CRCs)."""
        if self.keys.data_key is None and self.config.encryption != "none":
            return None
        return self.codec.decode

    def _build_caches(self, caches: Path) -> None:
        """Read-only open with a missing or damaged index or catalog: fill the temporary
        copies (``Store.__init__`` opened them read-only) from the packs and manifests."""
        for name in self.db_problems:
            if name == self.layout.index.name:
                self.index.close()
                index = Index(caches / name)
                try:
                    if self.remote is not None:
                        index_remote(index, self.remote, None, self._decode(), self.report)
                    else:
                        index_packs(index, self.layout.pack_files(), self._decode(), self.report)
                finally:
                    index.close()
                self.index = Index(caches / name, readonly=True)
            else:
                self.catalog.close()
                catalog = Catalog(caches / name)
                try:
                    catalog.reconcile(self.layout.committed_snapshots(), self.manifest)
                finally:
                    catalog.close()
                self.catalog = Catalog(caches / name, readonly=True)

    def close(self) -> None:
        """Flush (when writable), then release everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.writable:
                try:
                    self.flush()
                except StoreWriteError as e:
                    # A pack that failed to seal was abandoned, and every session that could
                    # refer to it failed its commit: nothing committed is at stake here.
                    log.warning("store.close_flush_failed", store=str(self.path), error=str(e))
        finally:
            if self._open is not None:
                self._open.abort()
                self._open = None
            self._sealer.shutdown(wait=True)
            self.index.close()
            self.catalog.close()
            if self.remote is not None:
                self.remote.close()
            if self._caches is not None:
                shutil.rmtree(self._caches, ignore_errors=True)
            if self._lock_file is not None:
                self._lock_file.release()
                self._lock_file = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- chunks ------------------------------------------------------------------------------

    def has(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored (sealed or in a pack being written) and not marked bad
        by verify (a bad chunk is stored again by the next put: ``Index.add_pack``)."""
        with self._wlock:
            if chunk_id in self._pending:
                return True
            changes = self._index_changes
        if self.index.has(chunk_id):
            return True
        self._absent.last = (chunk_id, changes)
        return False

    def _absent_still(self, chunk_id: bytes) -> bool:
        """Under ``_wlock``: this thread's last ``has`` found ``chunk_id`` absent, and no index
        addition began or ended since. Then the index cannot hold it now (this process is the
        only writer: ``locks``), and ``put`` spares the second SQLite lookup of every new
        chunk (~15 µs with the GIL held; ``make bench``). An addition under way, or a count
        that has moved, sends ``put`` to the index as before. Only additions count:
        the other flips to present (GC's judge un-condemning a chunk, verify unmarking a bad
        one) can at worst make ``put`` store a second copy, which ``Index.add_pack`` leaves
        unindexed (dead bytes that GC reclaims) — as when such a flip fell between ``put``'s
        own lookup and its pack's indexing before."""
        last = getattr(self._absent, "last", None)
        changes = self._index_changes
        running = self._additions_running
        return last is not None and last[0] == chunk_id and last[1] == changes and not running

    @contextmanager
    def _index_addition(self) -> Iterator[None]:
        """Around every addition of entries to the index (see ``_absent_still``)."""
        with self._wlock:
            self._index_changes += 1
            self._additions_running += 1
        try:
            yield
        finally:
            with self._wlock:
                self._index_changes += 1
                self._additions_running -= 1

    def put(self, chunk_id: ChunkId, record: bytes | bytearray | memoryview) -> bool:
        """Append a verified record unless its chunk is already stored; True if written."""
        if not self.writable:
            raise StoreError(path=self.path, reason="opened read-only")
        size = len(record)
        header = parse_header(record)
        if header.chunk_id != chunk_id or header.size != size:
            raise CorruptRecord(
                chunk=short(chunk_id), pack="(new)", offset=0, reason="record does not match id"
            )
        with self._wlock:
            if chunk_id in self._pending:
                return False
            if not self._absent_still(chunk_id) and self.index.has(chunk_id):
                return False
            writer = self._open
            try:
                if writer is None:
                    writer = self._open = PackWriter(self.layout.packs)
                offset = writer.append(chunk_id, record, header.plain_len)
            except BaseException as e:  # the pack's state is unknown: never use it again
                failure = self._abandon_locked(writer, e, needed=size)
                if is_write_failure(e):
                    raise failure from e
                raise  # not an I/O failure (a bug, an interrupt): abandoned, raised as is
            self._pending[chunk_id] = _Pending(writer, offset, size)
            if writer.size >= self.config.pack_size:
                self._rotate_locked()
        return True

    def write_token(self) -> int:
        """A mark to pass to ``flush(since=…)``: how many packs were abandoned so far."""
        with self._wlock:
            return self._abandoned

    def _abandon_locked(
        self, writer: PackWriter | None, error: BaseException, needed: int | None = None
    ) -> StoreWriteError:
        """Give up ``writer`` after a failed write, fsync, rename or index commit: it is
        never appended to or indexed again, its records stop deduplicating (``has`` is false
        for them, so the next put stores them again in a new pack) and sessions that began
        before now fail their commit (``flush(since=…)``). Returns the error to raise."""
        what = "a new pack" if writer is None else f"pack {writer.name}"
        failure = write_failure(self.path, what, error, needed)
        if writer is not None:
            if self._open is writer:
                self._open = None
            for cid in [c for c, p in self._pending.items() if p.writer is writer]:
                del self._pending[cid]
            writer.abort()
        self._abandoned += 1
        self._last_abandoned = failure
        log.error("store.pack_abandoned", store=str(self.path), error=str(failure))
        return failure

    def put_chunk(self, plain: bytes) -> ChunkId:
        """Hash, encode and put one chunk in the calling thread (small data: configs, tests)."""
        chunk_id = self.codec.chunk_id(plain)
        if not self.has(chunk_id):
            self.put(chunk_id, self.codec.encode(plain, chunk_id))
        return chunk_id

    @contextmanager
    def lease(self, kind: str, what: str) -> Iterator[Lease]:
        """Hold a lease while referencing chunks outside a ``SnapshotWriter`` (replication)."""
        with self.leases.hold(kind, what) as lease:
            yield lease

    def get_record(self, chunk_id: bytes) -> tuple[bytes, str, int]:
        """(record bytes, pack name, offset) of a stored chunk; raises ChunkMissing."""
        with self._wlock:
            pending = self._pending.get(chunk_id)
        if pending is not None:
            return (
                pending.writer.read(pending.offset, pending.length),
                pending.writer.name,
                pending.offset,
            )
        loc = self.index.lookup(chunk_id)
        if loc is None:
            raise ChunkMissing(chunk=short(chunk_id), context="")
        try:
            fd = self.open_pack(loc.pack)
        except FileNotFoundError:
            # GC may have repacked the chunk and retired the pack since the lookup.
            moved = self.index.lookup(chunk_id)
            if moved is not None and moved.pack != loc.pack:
                return self.get_record(chunk_id)
            raise StoreError(
                path=self.path, reason=f"pack {loc.pack} of chunk {short(chunk_id)} is missing"
            ) from None
        try:
            record = os.pread(fd, loc.length, loc.offset)
        finally:
            os.close(fd)
        if len(record) != loc.length:
            raise CorruptRecord(
                chunk=short(chunk_id), pack=loc.pack, offset=loc.offset, reason="pack is truncated"
            )
        return record, loc.pack, loc.offset

    def get_record_into(
        self, chunk_id: bytes, out: memoryview, where: Location | None = None
    ) -> tuple[int, str, int]:
        """``get_record`` into ``out`` (a restore reads into its pool buffers: no copy and
        no allocation per chunk); ``where`` is the location planned, checked by reading.
        Raises like ``get_record``, and ValueError when ``out`` is too small."""
        loc = where or self.index.lookup(chunk_id)
        if loc is None:  # maybe in the pack being written: the copying path handles that
            record, pack, offset = self.get_record(chunk_id)
            return self._fit(out, record, chunk_id), pack, offset
        if loc.length > len(out):
            raise ValueError(
                f"record of chunk {short(chunk_id)} ({loc.length} bytes) does not fit a "
                f"{len(out)}-byte buffer"
            )
        try:
            fd = self.open_pack(loc.pack)
        except FileNotFoundError:
            # GC repacked the chunk and retired the pack since planning: ask the index.
            moved = self.index.lookup(chunk_id)
            if moved is not None and moved != loc:
                return self.get_record_into(chunk_id, out, moved)
            raise StoreError(
                path=self.path, reason=f"pack {loc.pack} of chunk {short(chunk_id)} is missing"
            ) from None
        try:
            n = os.preadv(fd, [out[: loc.length]], loc.offset)
        finally:
            os.close(fd)
        if n != loc.length:
            raise CorruptRecord(
                chunk=short(chunk_id), pack=loc.pack, offset=loc.offset, reason="pack is truncated"
            )
        return n, loc.pack, loc.offset

    def open_pack(self, name: str) -> int:
        """A read-only file descriptor of sealed pack ``name`` (from the cache, fetched
        first when the pack lives in a bucket). FileNotFoundError when it is not there (in
        a bucket: no longer indexed, so GC retired it since the caller's lookup);
        ``PackMissing`` when an indexed pack is not in its bucket."""
        if self.remote is None:
            return os.open(pack_path(self.layout.packs, name), os.O_RDONLY | os.O_CLOEXEC)
        for _ in range(3):  # the cache may evict it between the fetch and the open
            # A cached pack needs no index query (one per record read would be a hot-path
            # SQLite lookup); only a fetch needs the size the index holds.
            path = self.remote.cached(name)
            if path is None:
                size = self.index.pack_size(name)
                if size is None:
                    raise FileNotFoundError(name)
                path = self.remote.local(name, size)
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
        raise StoreError(
            path=self.path,
            reason=f"pack {name} left the cache three times while being opened "
            f"(cache bound {self.remote.limit} bytes is too small for this load)",
        )

    def prefetch(self, packs: Sequence[str]) -> None:
        """A hint (``ChunkReader.prefetch``): a store in a bucket fetches these packs into
        its cache in the background (``PackCache.prefetch``); a local store ignores it."""
        if self.remote is not None:
            self.remote.prefetch([(n, s) for n in packs if (s := self.index.pack_size(n))])

    def pack_file(self, name: str) -> Path:
        """The local file of sealed, indexed pack ``name``: in ``packs/``, fetched into the
        cache first when the pack lives in a bucket (it may be evicted again later: open it
        at once). For maintenance that reads whole packs (verify, repack, repair)."""
        if self.remote is None:
            return pack_path(self.layout.packs, name)
        size = self.index.pack_size(name)
        if size is None:
            raise StoreError(path=self.path, reason=f"pack {name} is not indexed")
        return self.remote.local(name, size)

    def pack_trailer(self, name: str) -> tuple[int, list[PackEntry]]:
        """(size, trailer entries) of sealed pack ``name`` where packs live (in a bucket:
        one ranged GET of its tail). ``CorruptPack``; FileNotFoundError or ``PackMissing``
        when it is not there."""
        if self.remote is None:
            path = pack_path(self.layout.packs, name)
            if not path.exists():
                raise FileNotFoundError(path)
            return read_trailer(path, name)
        from engine.store.objects import read_trailer as read_object_trailer  # noqa: PLC0415

        return read_object_trailer(self.remote.objects, name)

    def pack_sizes(self) -> dict[str, int]:
        """Every sealed pack where packs live (``packs/``, or the bucket) by name: its size.
        One listing (paged on S3)."""
        if self.remote is None:
            out = {}
            for name, path in self.layout.pack_files().items():
                with contextlib.suppress(FileNotFoundError):
                    out[name] = path.stat().st_size
            return out
        return {p.name: p.size for p in self.remote.objects.list()}

    def publish_pack(self, sealed: SealedPack) -> None:
        """Make a pack sealed in ``packs/`` durable where packs live before it is indexed:
        nothing to do in a local store; in a bucket, an upload intent, then the upload
        (``engine.store.remote``). Raises on failure (the caller abandons the pack)."""
        if self.remote is None:
            return
        self.index.intend_upload(sealed.name, int(datetime.now(UTC).timestamp()))
        failpoints.hit("store.remote.before_put")
        until = self.remote.upload(sealed.name)
        if until is not None:  # object lock: the date, for renewals and GC
            self.index.set_locks({sealed.name: until})
        failpoints.hit("store.remote.after_put")

    def note_indexed(self, sealed: SealedPack) -> None:
        """A pack sealed in ``packs/`` was published and indexed: a store in a bucket keeps
        it in its cache (trimmed to the bound)."""
        if self.remote is not None:
            self.remote.added(sealed.name, sealed.size)

    def delete_packs(self, names: list[str], keep_refused: bool = True) -> list[str]:
        """Delete packs no longer indexed from where packs live: a bucket's objects (in
        batches) and their cached copies; nothing in a local store, whose callers move the
        files themselves (GC's trash, repair's quarantine). Returns the names a bucket
        with object lock refused (still locked); ``keep_refused``: leave each a GC trash
        marker with its date, so GC deletes it once the date is past."""
        if self.remote is None or not names:
            return []
        for name in names:
            self.remote.forget(name)
        refused = self.remote.objects.delete(names)
        if refused and keep_refused:
            from engine.store.remote import leave_for_gc  # noqa: PLC0415

            leave_for_gc(self.layout, self.index, self.remote.objects, refused)
        return refused

    @staticmethod
    def _fit(out: memoryview, record: bytes, chunk_id: bytes) -> int:
        if len(record) > len(out):
            raise ValueError(
                f"record of chunk {short(chunk_id)} ({len(record)} bytes) does not fit a "
                f"{len(out)}-byte buffer"
            )
        out[: len(record)] = record
        return len(record)

    def locate(self, chunk_id: bytes) -> Location | None:
        """Where a sealed, indexed chunk's record is (pack, offset, length), or None: not
        stored, or still in the pack being written. For planning reads (a restore groups
        them by pack) and sizing sends; ``get_record`` reads the record."""
        return self.index.lookup(chunk_id)

    def bad_chunk_ids(self) -> set[bytes]:
        """Chunks verify marked bad or missing (few: damage, not data). They do not
        deduplicate, so a backup reads their slots again rather than reuse a parent's id,
        and its put heals them."""
        return {b.chunk_id for b in self.index.bad_chunks()}

    def read_chunk(self, chunk_id: ChunkId) -> bytes:
        """The verified plaintext of a chunk (decoded in the calling thread)."""
        if chunk_id == ZERO_ID:
            raise ValueError("the ZERO id has no stored chunk; callers produce zeros")
        record, pack, offset = self.get_record(chunk_id)
        return self.codec.decode(record, chunk_id, pack, offset)

    def flush(self, since: int | None = None) -> None:
        """Seal the open pack and wait until every sealed pack's index entries are durable.

        Raises ``StoreWriteError`` if a pack being sealed failed, or — with ``since`` (a
        ``write_token()`` taken when a session began) — if any pack was abandoned since then:
        the session may have deduplicated against a record of that pack, so it must not
        commit. The store itself stays usable: the next put opens a new pack."""
        with self._wlock:
            if self._open is not None and self._open.entries:
                self._rotate_locked()
            # Every seal in flight, also those another thread's flush started: a chunk that
            # thread's put deduplicated against ours is durable only once its pack is.
            sealing = list(self._sealing)
        first: BaseException | None = None
        for fut in sealing:
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - wait for every seal, raise the first
                first = first or e
        with self._wlock:
            self._sealing = [f for f in self._sealing if not f.done()]
            abandoned, last = self._abandoned, self._last_abandoned
        if since is None:
            if first is not None:
                raise first
            return
        # With a token, only what failed since the session began concerns it (a seal that
        # failed before was abandoned before its records could be deduplicated against).
        if abandoned > since:
            assert last is not None
            raise StoreWriteError(
                path=self.path,
                what="this snapshot",
                reason=f"a pack was abandoned while it was written ({last.fields['what']}: "
                f"{last.fields['reason']}); it may refer to records of that pack",
            ) from last

    def _rotate_locked(self) -> None:
        writer, self._open = self._open, None
        assert writer is not None
        self._sealing.append(self._sealer.submit(self._seal, writer))

    def _seal(self, writer: PackWriter) -> None:
        with self._index_addition():
            try:
                sealed = writer.seal()
                self.publish_pack(sealed)
                healed = self.index.add_pack(sealed)
            except BaseException as e:  # every failure abandons: flush(since=…) relies on it
                with self._wlock:
                    failure = self._abandon_locked(writer, e)
                if is_write_failure(e):
                    raise failure from e
                raise
            with self._wlock:
                for entry in sealed.entries:
                    p = self._pending.get(entry.chunk_id)
                    if p is not None and p.writer is writer:
                        del self._pending[entry.chunk_id]
        self.note_indexed(sealed)
        self._healed(healed)

    def _healed(self, healed: list[ChunkId]) -> None:
        """Chunks verify had marked bad are stored again (``Index.add_pack`` repointed them
        to the new, durable record): drop them from the snapshots' damage marks. A failure
        here costs only a stale mark (``damage.damage_of`` re-checks), never the pack."""
        if healed:
            log.info("store.healed", store=str(self.path), chunks=[short(c) for c in healed])
            self._clear_marks()

    def _clear_marks(self) -> None:
        try:
            cleared = clear_healed(self.layout, self.index)
        except (OSError, ValueError, sqlite3.Error) as e:
            log.warning("store.heal_marks_failed", store=str(self.path), error=str(e))
            return
        if cleared:
            log.info("store.undamaged", store=str(self.path), snapshots=cleared)

    def add_sealed_pack(self, sealed: SealedPack) -> None:
        """Index a pack written into ``packs/`` by someone else (replication receiver, repair),
        published first where packs live (``publish_pack``)."""
        self.publish_pack(sealed)
        with self._index_addition():
            healed = self.index.add_pack(sealed)
        self.note_indexed(sealed)
        self._healed(healed)

    # --- snapshots ---------------------------------------------------------------------------

    def begin_snapshot(
        self,
        vm_id: str,
        vm_name: str,
        level: str,
        parent: str | None = None,
        time: datetime | None = None,
    ) -> SnapshotWriter:
        """Start a snapshot; nothing is visible until ``commit()`` writes its manifest."""
        if not self.writable:
            raise StoreError(path=self.path, reason="opened read-only")
        return SnapshotWriter(self, vm_id, vm_name, level, parent, time)

    def commit_manifest(self, manifest: Manifest) -> None:
        """Publish a manifest (the commit point) and list it in the catalog.

        Preconditions (``SnapshotWriter.commit`` ensures them): every chunk its DiskMaps
        reference is durable and indexed, and the DiskMaps are published.
        """
        path = self.layout.manifest(manifest.snapshot_id)
        try:
            atomic_write(path, manifest_mod.encode(manifest, self.keys), "store.manifest")
        except (OSError, sqlite3.Error) as e:
            raise write_failure(
                self.path, f"manifest {path.name} of {manifest.snapshot_id}", e
            ) from e
        self._put_snapshot(manifest.snapshot_id)
        self._renew_locks(manifest)
        # The manifest is the commit point: from here on the snapshot exists. The catalog is
        # a cache; a failure to list it there must not turn a committed backup into a failed
        # one. It is reconciled with the manifests on the next listing (and on open).
        try:
            self.catalog.add(manifest)
        except (OSError, sqlite3.Error) as e:
            self._catalog_stale = True
            log.warning(
                "store.catalog_stale",
                store=str(self.path),
                snapshot=manifest.snapshot_id,
                error=str(write_failure(self.path, "catalog.db", e)),
            )

    def _put_snapshot(self, snapshot_id: str) -> None:
        """A store in a bucket puts a committed snapshot there too; a failure is a warning
        (committed here; the next writer's open puts it: ``remote.unsent_snapshots``)."""
        if self.remote is None:
            return
        from engine.store.remote import put_snapshot  # noqa: PLC0415

        try:
            put_snapshot(self.remote.objects, self.layout, snapshot_id)
        except (OSError, StoreError) as e:
            log.warning(
                "store.snapshot_not_in_bucket",
                store=str(self.path),
                snapshot=snapshot_id,
                where=self.remote.where,
                error=str(e),
            )

    def _renew_locks(self, manifest: Manifest) -> None:
        """Object lock (``engine.store.retention``): every pack the committed snapshot
        needs, and the configuration and key file, locked until at least now + the lock
        duration; those whose recorded date falls short (or is unknown) are renewed to
        ``date(now)``. A failure (the bucket, the index) is a warning: the snapshot is
        committed and stays so, and the next commit renews what is still short (what was
        renewed is recorded, the rest keeps its old date)."""
        lock = None if self.remote is None else self.remote.objects.lock
        if lock is None:
            return
        try:
            self._renew_locks_of(manifest, lock)
        except (OSError, sqlite3.Error, EngineError) as e:  # committed: never fail it now
            log.warning(
                "store.locks_not_renewed",
                store=str(self.path),
                snapshot=manifest.snapshot_id,
                error=str(e),
            )

    def _renew_locks_of(self, manifest: Manifest, lock: LockPolicy) -> None:
        from engine.store.remote import CONFIG_KEY, KEY_KEY  # noqa: PLC0415

        now = self.remote.objects.clock()  # type: ignore[union-attr]
        names: set[str] = {CONFIG_KEY}
        if self.layout.default_key_file.exists():  # put in the bucket at init (``publish_store``)
            names.add(KEY_KEY)
        for disk in manifest.disks:
            with self.open_diskmap(manifest, disk) as dm:
                ids: list[bytes] = sorted({cid for _, cid in dm.iter_ids() if any(cid)})
            names.update(self.index.packs_of(ids).values())
        dates = self.index.locks(names)
        short = sorted(n for n in names if not lock.covers(dates.get(n), now))
        until = lock.date(now)
        renewed: dict[str, int] = {}
        try:
            for name in short:
                failpoints.hit("store.locks.before_renew")
                if name in (CONFIG_KEY, KEY_KEY):
                    self.remote.objects.retain_key(name, until)  # type: ignore[union-attr]
                else:
                    self.remote.objects.retain(name, until)  # type: ignore[union-attr]
                renewed[name] = until
        finally:  # what was renewed is recorded, also when a renewal failed
            if renewed:
                self.index.set_locks(renewed)
                log.info("store.locks_renewed", snapshot=manifest.snapshot_id, objects=len(renewed))

    def snapshot_removed(self, snapshot_id: str) -> None:
        """Prune removed the snapshot (moved it to ``removed/``): a store in a bucket deletes
        its copy there, so a re-attach never brings it back. A failure is a warning."""
        if self.remote is None:
            return
        from engine.store.remote import drop_snapshot  # noqa: PLC0415

        try:
            drop_snapshot(self.remote.objects, snapshot_id)
            (self.layout.root / "removed" / snapshot_id / IN_BUCKET).unlink(missing_ok=True)
        except (OSError, StoreError) as e:
            log.warning(
                "store.removed_snapshot_left_in_bucket",
                store=str(self.path),
                snapshot=snapshot_id,
                where=self.remote.where,
                error=str(e),
            )

    def snapshot_restored(self, snapshot_id: str) -> None:
        """A removal was undone: a store in a bucket puts the snapshot there again."""
        if self.remote is not None:
            (self.layout.snapshot_dir(snapshot_id) / IN_BUCKET).unlink(missing_ok=True)
            self._put_snapshot(snapshot_id)

    def _reconcile_catalog(self) -> None:
        """Bring the catalog up to date after a failed ``catalog.add`` (writer only)."""
        if not (self._catalog_stale and self.writable):
            return
        try:
            self.catalog.reconcile(self.layout.committed_snapshots(), self.manifest)
        except (OSError, sqlite3.Error) as e:
            log.warning("store.catalog_stale", store=str(self.path), error=str(e))
            return
        self._catalog_stale = False

    def snapshots(self, vm: str | None = None) -> list[CatalogEntry]:
        self._reconcile_catalog()
        return self.catalog.entries(vm)

    def resolve(self, ref: str) -> str:
        """A full snapshot id from an id or a unique prefix (at least one character);
        raises SnapshotNotFound."""
        if not ref:  # a prefix of every id: "the only snapshot" is never what was meant
            raise SnapshotNotFound(snapshot=ref, reason="an empty snapshot reference")
        self._reconcile_catalog()
        matches = self.catalog.match(ref)
        if ref in matches:
            return ref
        if len(matches) == 1:
            return matches[0]
        reason = "no such snapshot" if not matches else f"ambiguous ({len(matches)} match)"
        raise SnapshotNotFound(snapshot=ref, reason=reason)

    def manifest(self, snapshot_id: str) -> Manifest:
        path = self.layout.manifest(snapshot_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotNotFound(snapshot=snapshot_id, reason="no manifest") from None
        return manifest_mod.decode(raw, self.keys, snapshot_id, path)

    def reading_snapshot(self, snapshot_id: str) -> AbstractContextManager[None]:
        """Share-lock a snapshot while it is read (``locks.reading_snapshot``): prune skips
        it meanwhile. Raises SnapshotNotFound when it has no manifest."""
        return locks.reading_snapshot(self.layout, snapshot_id)

    def open_diskmap(self, manifest: Manifest, disk: DiskEntry) -> DiskMap:
        """Open a snapshot's DiskMap, checked against the checksum its manifest records."""
        return DiskMap(
            self.layout.snapshot_dir(manifest.snapshot_id) / disk.diskmap,
            bytes.fromhex(disk.diskmap_checksum),
        )

    # --- information and repair ---------------------------------------------------------------

    def info(self) -> StoreInfo:
        return _info(self.path, self.config, self.index, self.catalog)

    @classmethod
    def keyless_info(cls, path: Path) -> StoreInfo | None:
        """The store's ``info`` without its key: the configuration and the index and catalog
        hold no secret (sizes and counts, not data). None when the index or catalog is
        missing or damaged: then only an open with the key (which rebuilds them from the
        packs and manifests) can count. Raises StoreError if ``path`` is not a store."""
        layout = Layout(path)
        config = StoreConfig.load(path)
        with dbfiles.os_errors(path), dbfiles.sqlite_errors(layout.index):
            if _db_problems(layout):
                return None
            index, catalog = Index(layout.index, readonly=True), Catalog(layout.catalog, True)
            try:
                return _info(layout.root, config, index, catalog)
            finally:
                index.close()
                catalog.close()

    def rebuild_index(self) -> RecoveryReport:
        """Forget the index and rebuild it from every sealed pack: from its trailer, or from
        a scan of its records when the trailer is damaged (``recovery``). What the open
        found wrong with the SQLite files (``report.files``) is kept in the report. Raises
        StoreError naming the file on a full disk or an unusable database."""
        files = self.report.files
        self.flush()
        with dbfiles.os_errors(self.path), dbfiles.sqlite_errors(self.layout.index):
            self.index.clear()
            self.report = recover(
                self.layout, self.index, self.catalog, self.manifest, self._decode()
            )
        self.report.files = files
        return self.report


def _info(path: Path, config: StoreConfig, index: Index, catalog: Catalog) -> StoreInfo:
    stats = index.stats()
    snaps = catalog.entries()
    return StoreInfo(
        path=str(path),
        format=config.format,
        store_id=config.store_id,
        chunk_size=config.chunk_size,
        encryption=config.encryption,
        pack_size=config.pack_size,
        zstd_level=config.zstd_level,
        packs=stats.packs,
        chunks=stats.chunks,
        unique_bytes=stats.plain_bytes,
        stored_bytes=stats.stored_bytes,
        pack_bytes=stats.pack_bytes,
        snapshots=len(snaps),
        logical_bytes=sum(s.data_bytes for s in snaps),
        packs_in=(
            f"{config.remote.url} at {config.remote.endpoint} (cache "
            f"{config.remote.cache_bytes} bytes in packs/"
            + (
                f"; object lock {lock.mode} {describe_duration(lock.seconds)})"
                if (lock := config.remote.lock) is not None
                else ")"
            )
            if config.remote is not None
            else None
        ),
    )


@contextmanager
def _claimed_bucket(
    config: StoreConfig, remote: RemoteConfig, s3_key: tuple[str, str]
) -> "Iterator[InitBucket]":
    """``init`` of a store in a bucket: the bucket probed and its prefix claimed, open for
    the rest of the init (one probe, not one per step; S3 code loads only for a bucket)."""
    from engine.store.remote import InitBucket  # noqa: PLC0415 - botocore: only for a bucket

    bucket = InitBucket.claim(remote, s3_key, config.store_id)
    try:
        yield bucket
    finally:
        bucket.close()


def _open_remote(
    layout: Layout, config: StoreConfig, remote: RemoteConfig, writable: bool
) -> "PackCache":
    """The cache of a store whose packs live in a bucket, the bucket probed and, for a
    writer, its writer lock taken (S3 code is loaded only for such a store)."""
    from engine.store.budget import RequestBudget  # noqa: PLC0415
    from engine.store.objects import S3Packs  # noqa: PLC0415 - botocore: only for a bucket
    from engine.store.remote import PackCache, endpoint, take_writer_lock  # noqa: PLC0415

    budget = RequestBudget(layout.root, remote.requests_per_second, remote.requests_per_month)
    where = endpoint(layout, remote)
    packs = S3Packs.open(where, remote.prefix, budget, probe=writable, lock=remote.lock)
    try:
        version = take_writer_lock(packs, layout) if writable else None
    except BaseException:
        packs.close()
        raise
    lock = layout if writable else None
    return PackCache(layout.packs, packs, remote.cache_bytes, config.pack_size, lock, version)


def _db_problems(layout: Layout) -> dict[str, str]:
    """``{file name: what is wrong}`` for the index and catalog (``dbfiles.problem``)."""
    out = {}
    for path in (layout.index, layout.catalog):
        why = dbfiles.problem(path)
        if why is not None:
            out[path.name] = f"{path.name} {why}"
    return out


def _set_aside(layout: Layout, problems: dict[str, str]) -> list[str]:
    """Writable open: move a damaged database aside (a missing one's leftover WAL too), so
    ``Store.__init__`` creates an empty one that recovery fills; what was done, as lines."""
    lines = []
    for name, why in problems.items():
        path = layout.root / name
        source = "the packs" if path == layout.index else "the manifests"
        if path.exists():
            moved = dbfiles.move_aside(path)
            lines.append(f"{why}: moved aside to {moved.name}, rebuilt from {source}")
        else:
            dbfiles.drop_orphans(path)
            lines.append(f"{why}: rebuilt from {source}")
    return lines


if TYPE_CHECKING:  # mypy proves the Store fits the protocols its users type against

    def _fits(store: Store) -> tuple[ChunkReader, ChunkWriter, BackupStore]:
        return store, store, store
