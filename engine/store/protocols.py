"""What the store's users see of it: one ``Protocol`` per kind of consumer.

``Store`` (``chunk_store``) is the one implementation; mypy proves it fits every protocol
here (the check at the end of ``chunk_store``). A consumer types its store as the narrowest
protocol that has what it calls, so a reader cannot write and neither can reach into the
index or the files::

    protocol      members                                          used by
    ------------  -----------------------------------------------  ----------------------------
    ChunkReader   config; has, locate, get_record, read_chunk;     restore (disk and job);
                  snapshots, resolve, manifest, open_diskmap,      replication (the sender's
                  reading_snapshot                                 ``SendingStore`` adds keys,
                                                                   layout and path); standby's
                                                                   latest snapshot
    ChunkWriter   config, codec; has, put, bad_chunk_ids;          the backup pipeline
                  begin_snapshot (a ``SnapshotWriter``)            (``backup_disk``)
    BackupStore   ChunkReader + ChunkWriter                        the backup job (reads its
                                                                   parent, writes its snapshot)

Store maintenance (GC, prune, repair, verify and its checker, space accounting), the
replication receiver, crash recovery and the standby job work on the store's files and
index (or hand the store to a plugin) and take the ``Store`` itself; so does the process
that opens it (the daemon, the CLI).

``config`` and ``codec`` are values (chunk size, store id; the keyed hash and record codec).
DiskMaps and ``SnapshotWriter`` are files, so another implementation (the in-memory
``tests.memory_store.MemoryStore``) still keeps those in a directory. Both run the contract
suite ``tests/contract/test_store.py``. Every method may block (SQLite, file reads).
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Protocol

from engine.core.ids import ChunkId
from engine.store.catalog import CatalogEntry
from engine.store.codec import Codec
from engine.store.diskmap import DiskMap
from engine.store.index import Location
from engine.store.layout import StoreConfig
from engine.store.manifest import DiskEntry, Manifest
from engine.store.snapshot import SnapshotWriter


class ChunkReader(Protocol):
    """Reads chunks by id and committed snapshots (catalog, manifests, DiskMaps)."""

    @property
    def config(self) -> StoreConfig: ...

    def has(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored and not marked bad or condemned by GC."""
        ...

    def locate(self, chunk_id: bytes) -> Location | None:
        """Where a sealed chunk's record is (pack, offset, length), or None."""
        ...

    def get_record(self, chunk_id: bytes) -> tuple[bytes, str, int]:
        """(record bytes, pack, offset), not decoded; raises ChunkMissing."""
        ...

    def get_record_into(
        self, chunk_id: bytes, out: memoryview, where: Location | None = None
    ) -> tuple[int, str, int]:
        """``get_record`` read straight into ``out``: (record length, pack, offset).
        ``where``: the chunk's location as a planner found it (saves a lookup; if the chunk
        has moved since, it is looked up again). ValueError if ``out`` is too small."""
        ...

    def read_chunk(self, chunk_id: ChunkId) -> bytes:
        """The verified plaintext; raises an integrity error, never returns wrong bytes."""
        ...

    def prefetch(self, packs: Sequence[str]) -> None:
        """A hint: these packs will be read soon, in this order (a restore's planner gives
        each window's). A store whose packs are far (a bucket) starts fetching them in the
        background; others ignore it. Never blocks, never raises."""
        ...

    def snapshots(self, vm: str | None = None) -> list[CatalogEntry]:
        """Committed snapshots by VM name and time (``vm``: one VM, by id or name)."""
        ...

    def resolve(self, ref: str) -> str:
        """A full snapshot id from an id or a unique prefix; raises SnapshotNotFound."""
        ...

    def manifest(self, snapshot_id: str) -> Manifest:
        """The authenticated manifest; raises SnapshotNotFound or ManifestTampered."""
        ...

    def open_diskmap(self, manifest: Manifest, disk: DiskEntry) -> DiskMap:
        """A disk's DiskMap, checked against its manifest's checksum; the caller closes it."""
        ...

    def reading_snapshot(self, snapshot_id: str) -> AbstractContextManager[None]:
        """Hold a snapshot while reading it (prune skips it); raises SnapshotNotFound."""
        ...


class ChunkWriter(Protocol):
    """Puts records (deduplicated) and begins snapshots that commit them."""

    @property
    def config(self) -> StoreConfig: ...

    @property
    def codec(self) -> Codec: ...

    def has(self, chunk_id: bytes) -> bool:
        """True if a put of this chunk would write nothing (stored and not marked bad)."""
        ...

    def put(self, chunk_id: ChunkId, record: bytes | bytearray | memoryview) -> bool:
        """Append a verified record unless its chunk is stored; True if written."""
        ...

    def bad_chunk_ids(self) -> set[bytes]:
        """Chunks verify marked bad or missing: a backup reads their slots again."""
        ...

    def begin_snapshot(
        self,
        vm_id: str,
        vm_name: str,
        level: str,
        parent: str | None = None,
        time: datetime | None = None,
    ) -> SnapshotWriter:
        """A snapshot under construction; nothing is visible until it commits."""
        ...


class BackupStore(ChunkReader, ChunkWriter, Protocol):
    """A backup reads its parent snapshot and writes the new one."""
