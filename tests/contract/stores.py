"""The implementations the store contract suite runs, one factory each.

``STORES`` maps an implementation's name to a context manager factory
``factory(tmp_path, request)`` giving a ``StoreHarness``: the store under test as its users type it
(``BackupStore``: a ``ChunkReader`` and a ``ChunkWriter``), and the faults the suite needs
from outside the protocols (verify's bad-chunk marks, a record or manifest damaged where
the store keeps it). ``test_store.py`` runs every test with every factory.

Implementations: ``Store`` on a temporary directory with AES-GCM records and with plaintext
records, ``Store`` with its packs in a bucket of a real Ceph RGW (``tests.s3.rgw``) and a
cache bound of two packs (so reads fetch evicted packs again), the same in a bucket with
object lock (a versioned bucket: create-only and the writer lock by versions, every object
locked; ``engine.store.retention``), and ``tests.memory_store.MemoryStore``.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import pytest

from engine.core.ids import ChunkId
from engine.io.s3 import S3Endpoint
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.index import BadChunk
from engine.store.keys import StoreKeys
from engine.store.layout import ENCRYPTION_AES, Layout, RemoteConfig
from engine.store.leases import LeaseRegistry
from engine.store.manifest import DiskEntry, Manifest
from engine.store.objects import S3Packs
from engine.store.protocols import BackupStore
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.memory_store import MemoryStore

CHUNK: Final = fmt.MIN_CHUNK_SIZE  # 64 KiB: the smallest chunk a store allows keeps it fast


class StoreHarness(Protocol):
    store: BackupStore
    keys: StoreKeys  # what a CPU pool for this store is made with

    def mark_bad(self, chunk_id: ChunkId, missing: bool) -> None:
        """What verify records for a chunk whose record is damaged (``missing`` False: the
        chunk must be stored and its snapshot committed) or that is referenced but not
        stored (``missing`` True: the chunk must not be stored)."""
        ...

    def damage(self, chunk_id: ChunkId) -> None:
        """Flip a byte inside the payload of a stored chunk's record, where the store keeps
        it (the chunk's snapshot must be committed)."""
        ...

    def tamper_manifest(self, snapshot_id: str) -> None:
        """Change one byte of a committed snapshot's manifest, where the store keeps it."""
        ...

    def diskmap_file(self, manifest: Manifest, disk: DiskEntry) -> Path:
        """The file a committed DiskMap is (``protocols``: DiskMaps are files everywhere)."""
        ...

    def leftovers(self) -> list[str]:
        """What snapshots that never committed left: their directories, their leases."""
        ...


def _leftovers(layout: Layout, leases: LeaseRegistry, committed: set[str]) -> list[str]:
    out = [
        f"snapshot directory {p.name}"
        for p in layout.snapshots.iterdir()
        if p.is_dir() and p.name not in committed
    ]
    return out + [f"lease {lease.kind} {lease.what}" for lease in leases.live()]


def _flip(data: bytearray, at: int) -> None:
    data[at] ^= 0x01


class StoreOnDisk:
    def __init__(self, store: Store) -> None:
        self.real = store
        self.store: BackupStore = store
        self.keys = store.keys

    def mark_bad(self, chunk_id: ChunkId, missing: bool) -> None:
        since = datetime.now(UTC).isoformat()
        if missing:
            mark = BadChunk(chunk_id, None, None, "referenced, not stored", since)
        else:
            loc = self.real.locate(chunk_id)
            assert loc is not None, "mark a damaged chunk of a committed snapshot"
            mark = BadChunk(chunk_id, loc.pack, loc.offset, "damaged", since)
        assert self.real.index.mark_bad([mark]) == 1

    def damage(self, chunk_id: ChunkId) -> None:
        loc = self.real.locate(chunk_id)
        assert loc is not None, "damage a chunk of a committed snapshot"
        at = loc.offset + fmt.RECORD_HEADER.size + 1
        if self.real.remote is not None:  # the object in the bucket, and no cached copy
            objects = self.real.remote.objects
            assert isinstance(objects, S3Packs)
            data = bytearray(objects.read(loc.pack, 0, 1 << 40))
            _flip(data, at)
            objects.client.delete([objects.key(loc.pack)])
            objects.client.put(objects.key(loc.pack), bytes(data))
            self.real.remote.forget(loc.pack)
            return
        path = self.real.layout.pack_files()[loc.pack]
        with path.open("r+b") as f:
            f.seek(at)
            byte = bytearray(f.read(1))
            _flip(byte, 0)
            f.seek(at)
            f.write(byte)

    def tamper_manifest(self, snapshot_id: str) -> None:
        path = self.real.layout.manifest(snapshot_id)
        raw = bytearray(path.read_bytes())
        _flip(raw, len(raw) - 2)
        path.write_bytes(raw)

    def diskmap_file(self, manifest: Manifest, disk: DiskEntry) -> Path:
        return self.real.layout.snapshot_dir(manifest.snapshot_id) / disk.diskmap

    def leftovers(self) -> list[str]:
        layout = self.real.layout
        return _leftovers(layout, self.real.leases, layout.committed_snapshots())


class StoreInMemory:
    def __init__(self, store: MemoryStore) -> None:
        self.memory = store
        self.store: BackupStore = store
        self.keys = store.keys

    def mark_bad(self, chunk_id: ChunkId, missing: bool) -> None:
        assert self.memory.has(chunk_id) != missing
        self.memory.mark_bad(chunk_id)

    def damage(self, chunk_id: ChunkId) -> None:
        self.memory.damage(chunk_id)

    def tamper_manifest(self, snapshot_id: str) -> None:
        self.memory.tamper_manifest(snapshot_id)

    def diskmap_file(self, manifest: Manifest, disk: DiskEntry) -> Path:
        return self.memory.layout.snapshot_dir(manifest.snapshot_id) / disk.diskmap

    def leftovers(self) -> list[str]:
        committed = {e.snapshot_id for e in self.memory.snapshots()}
        return _leftovers(self.memory.layout, self.memory.leases, committed)


Factory = Callable[[Path, pytest.FixtureRequest], AbstractContextManager[StoreHarness]]


def on_disk(encryption: str) -> Factory:
    @contextmanager
    def factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreHarness]:
        path = tmp_path / "store"
        Store.init(
            path,
            chunk_size=CHUNK,
            encryption=encryption,
            pack_size=1024 * 1024,
            passphrase=PASSPHRASE,
            kdf=CHEAP_KDF,
        )
        with Store.open(path, passphrase=PASSPHRASE) as store:
            yield StoreOnDisk(store)

    return factory


def in_bucket(object_lock: str = "") -> Factory:
    """A store whose packs are in a bucket; with ``object_lock`` a bucket made with object
    lock and a store locking everything for a day (GOVERNANCE: the test's cleanup may
    bypass it, COMPLIANCE could not be undone)."""

    @contextmanager
    def factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreHarness]:
        bucket: S3Endpoint = request.getfixturevalue("s3_buckets")(object_lock=bool(object_lock))
        path = tmp_path / "store"
        pack_size = 1024 * 1024
        remote = RemoteConfig(
            bucket.url,
            bucket.bucket,
            "stores/a/",
            cache_bytes=2 * pack_size,
            object_lock=object_lock,
            lock_seconds=86400 if object_lock else 0,
        )
        Store.init(
            path,
            chunk_size=CHUNK,
            pack_size=pack_size,
            passphrase=PASSPHRASE,
            kdf=CHEAP_KDF,
            remote=remote,
            s3_key=(bucket.access_key, bucket.secret_key),
        )
        with Store.open(path, passphrase=PASSPHRASE) as store:
            yield StoreOnDisk(store)

    return factory


@contextmanager
def in_memory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreHarness]:
    yield StoreInMemory(MemoryStore(tmp_path / "memory", chunk_size=CHUNK))


STORES: Final[dict[str, Factory]] = {
    "store-aes": on_disk(ENCRYPTION_AES),
    "store-plain": on_disk("none"),
    "store-s3": in_bucket(),
    "store-s3-locked": in_bucket("GOVERNANCE"),
    "memory": in_memory,
}
