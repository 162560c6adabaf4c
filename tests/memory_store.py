"""An in-memory chunk store, for unit tests and the store contract suite.

``MemoryStore`` is a ``BackupStore`` (``engine.store.protocols``: a ``ChunkReader`` and a
``ChunkWriter``; mypy checks it at the end of this module) whose records, index, bad-chunk
list, manifests and catalog are Python dicts. What the protocols hand out as files stays
files: ``begin_snapshot`` gives the store's own ``SnapshotWriter``, which writes DiskMaps
into ``root/snapshots/<id>/``, and ``open_diskmap`` opens them (``protocols`` says so). The
product does not ship it.

::

    store = MemoryStore(tmp_path)          # 64 KiB chunks, AES-GCM records, fresh keys
    await run_backup(store=store, ...)     # any consumer typed against the protocols

Where it differs from ``Store``, on purpose:

- Nothing is durable and nothing is sealed: a put is indexed at once, so ``locate`` knows a
  chunk as soon as it is put (``Store.locate`` only once its pack is sealed) and ``flush``
  has nothing to do. Every record is in one pseudo-pack, ``PACK``, at the offset it would
  have had appended to a log.
- No GC (nothing is ever condemned), no prune, no leases beyond the ``SnapshotWriter``'s
  own, no write failures (``write_token`` never moves).
- A put of a chunk marked bad stores it again and heals it at once (``Store`` heals when the
  new record's pack is sealed, at the latest when the snapshot commits).
- Manifests are kept as the bytes ``Store`` would write (MAC included) and decoded on every
  ``manifest`` call, so tampering is detected the same way; ``reading_snapshot`` counts
  readers instead of taking a file lock.

Faults and observation (for tests): ``mark_bad`` (verify's finding: damaged or missing),
``damage`` (flip a byte of a stored record), ``tamper_manifest``; ``readers`` counts the
snapshots held by ``reading_snapshot``. Thread-safe: consumers call it from executor threads.
"""

import collections
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import ChunkMissing, CorruptRecord, SnapshotNotFound
from engine.core.ids import ZERO_ID, ChunkId, short
from engine.core.units import KiB, MiB
from engine.store import format as fmt
from engine.store import manifest as manifest_mod
from engine.store.catalog import CatalogEntry
from engine.store.codec import Codec, parse_header
from engine.store.diskmap import DiskMap
from engine.store.index import Location
from engine.store.keys import StoreKeys
from engine.store.layout import ENCRYPTION_AES, STORE_FORMAT, Layout, StoreConfig
from engine.store.leases import LeaseRegistry
from engine.store.manifest import DiskEntry, Manifest
from engine.store.snapshot import SnapshotWriter

if TYPE_CHECKING:
    from engine.store.protocols import BackupStore, ChunkReader, ChunkWriter
    from engine.store.snapshot import SnapshotHost

PACK: Final = "memory"  # the pack name every record reports


class MemoryStore:
    """A ``BackupStore`` in dicts, with DiskMaps under ``root`` (module docstring)."""

    def __init__(
        self, root: Path, *, chunk_size: int = 64 * KiB, keys: StoreKeys | None = None
    ) -> None:
        """``keys``: another store's (to compare ids with it), else new AES-GCM keys; keys
        without a data key make a store of plaintext records."""
        self.keys = keys if keys is not None else StoreKeys.generate(encrypted=True)
        self.codec = Codec(self.keys)
        self.config = StoreConfig(
            format=STORE_FORMAT,
            store_id=secrets.token_hex(16),
            chunk_size=chunk_size,
            encryption=ENCRYPTION_AES if self.keys.data_key is not None else "none",
            pack_size=64 * MiB,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.path = root
        self.layout = Layout(root)
        self.layout.snapshots.mkdir(parents=True, exist_ok=True)
        self.leases = LeaseRegistry()
        self.readers: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._records: dict[bytes, tuple[bytes, int]] = {}  # id → (record, offset)
        self._end = 0  # where the next record would be appended
        self._bad: set[bytes] = set()
        self._manifests: dict[str, bytes] = {}  # snapshot id → the manifest file's bytes
        self._catalog: dict[str, CatalogEntry] = {}

    # --- chunks ------------------------------------------------------------------------------

    def has(self, chunk_id: bytes) -> bool:
        with self._lock:
            return chunk_id in self._records and chunk_id not in self._bad

    def put(self, chunk_id: ChunkId, record: bytes | bytearray | memoryview) -> bool:
        header = parse_header(record)
        if header.chunk_id != chunk_id or header.size != len(record):
            raise CorruptRecord(
                chunk=short(chunk_id), pack="(new)", offset=0, reason="record does not match id"
            )
        with self._lock:
            if chunk_id in self._records and chunk_id not in self._bad:
                return False
            self._records[bytes(chunk_id)] = (bytes(record), self._end)
            self._end += len(record)
            self._bad.discard(chunk_id)  # healed
        return True

    def put_chunk(self, plain: bytes) -> ChunkId:
        """Hash, encode and put one chunk (``SnapshotWriter.set_config``, tests)."""
        chunk_id = self.codec.chunk_id(plain)
        if not self.has(chunk_id):
            self.put(chunk_id, self.codec.encode(plain, chunk_id))
        return chunk_id

    def get_record(self, chunk_id: bytes) -> tuple[bytes, str, int]:
        with self._lock:
            found = self._records.get(chunk_id)
        if found is None:
            raise ChunkMissing(chunk=short(chunk_id), context="")
        record, offset = found
        return record, PACK, offset

    def get_record_into(
        self, chunk_id: bytes, out: memoryview, where: Location | None = None
    ) -> tuple[int, str, int]:
        record, pack, offset = self.get_record(chunk_id)  # no packs: where changes nothing
        if len(record) > len(out):
            raise ValueError(f"record of {len(record)} bytes does not fit {len(out)} bytes")
        out[: len(record)] = record
        return len(record), pack, offset

    def locate(self, chunk_id: bytes) -> Location | None:
        with self._lock:
            found = self._records.get(chunk_id)
        if found is None:
            return None
        record, offset = found
        return Location(PACK, offset, len(record), parse_header(record).plain_len)

    def read_chunk(self, chunk_id: ChunkId) -> bytes:
        if chunk_id == ZERO_ID:
            raise ValueError("the ZERO id has no stored chunk; callers produce zeros")
        record, pack, offset = self.get_record(chunk_id)
        return self.codec.decode(record, chunk_id, pack, offset)

    def prefetch(self, packs: Sequence[str]) -> None:
        pass  # everything is in memory

    def bad_chunk_ids(self) -> set[bytes]:
        with self._lock:
            return set(self._bad)

    def flush(self, since: int | None = None) -> None:
        """Nothing to seal: every put is indexed at once."""

    def write_token(self) -> int:
        return 0  # no write ever fails, so no snapshot is ever refused its commit

    # --- snapshots ---------------------------------------------------------------------------

    def begin_snapshot(
        self,
        vm_id: str,
        vm_name: str,
        level: str,
        parent: str | None = None,
        time: datetime | None = None,
    ) -> SnapshotWriter:
        return SnapshotWriter(self, vm_id, vm_name, level, parent, time)

    def commit_manifest(self, manifest: Manifest) -> None:
        """The commit point (``SnapshotWriter.commit`` calls it last): listed at once."""
        raw = manifest_mod.encode(manifest, self.keys)
        entry = CatalogEntry(
            snapshot_id=manifest.snapshot_id,
            vm_id=manifest.vm_id,
            vm_name=manifest.vm_name,
            time=manifest.time,
            level=manifest.level,
            parent=manifest.parent,
            disks=len(manifest.disks),
            size=manifest.size,
            data_bytes=manifest.data_bytes,
        )
        with self._lock:
            self._manifests[manifest.snapshot_id] = raw
            self._catalog[manifest.snapshot_id] = entry

    def snapshots(self, vm: str | None = None) -> list[CatalogEntry]:
        with self._lock:
            entries = list(self._catalog.values())
        if vm is None:
            return sorted(entries, key=lambda e: (e.vm_name, e.time, e.snapshot_id))
        mine = [e for e in entries if vm in (e.vm_id, e.vm_name)]
        return sorted(mine, key=lambda e: (e.time, e.snapshot_id))

    def resolve(self, ref: str) -> str:
        if not ref:
            raise SnapshotNotFound(snapshot=ref, reason="an empty snapshot reference")
        with self._lock:
            matches = sorted(sid for sid in self._catalog if sid.startswith(ref))
        if ref in matches:
            return ref
        if len(matches) == 1:
            return matches[0]
        reason = "no such snapshot" if not matches else f"ambiguous ({len(matches)} match)"
        raise SnapshotNotFound(snapshot=ref, reason=reason)

    def manifest(self, snapshot_id: str) -> Manifest:
        with self._lock:
            raw = self._manifests.get(snapshot_id)
        if raw is None:
            raise SnapshotNotFound(snapshot=snapshot_id, reason="no manifest")
        return manifest_mod.decode(raw, self.keys, snapshot_id, f"(memory) {snapshot_id}")

    def open_diskmap(self, manifest: Manifest, disk: DiskEntry) -> DiskMap:
        return DiskMap(
            self.layout.snapshot_dir(manifest.snapshot_id) / disk.diskmap,
            bytes.fromhex(disk.diskmap_checksum),
        )

    def reading_snapshot(self, snapshot_id: str) -> AbstractContextManager[None]:
        return self._reading(snapshot_id)

    @contextmanager
    def _reading(self, snapshot_id: str) -> Iterator[None]:
        with self._lock:
            if snapshot_id not in self._manifests:
                raise SnapshotNotFound(snapshot=snapshot_id, reason="no manifest")
            self.readers[snapshot_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self.readers[snapshot_id] -= 1

    # --- faults, for tests -------------------------------------------------------------------

    def mark_bad(self, chunk_id: bytes) -> None:
        """What verify does for a damaged or missing chunk: it stops deduplicating."""
        with self._lock:
            self._bad.add(bytes(chunk_id))

    def damage(self, chunk_id: bytes) -> None:
        """Flip one byte inside a stored record's payload."""
        with self._lock:
            record, offset = self._records[chunk_id]
            bad = bytearray(record)
            bad[fmt.RECORD_HEADER.size + 1] ^= 0x01
            self._records[chunk_id] = (bytes(bad), offset)

    def tamper_manifest(self, snapshot_id: str) -> None:
        """Change one byte of a manifest's body (its MAC no longer matches)."""
        with self._lock:
            raw = bytearray(self._manifests[snapshot_id])
            raw[-2] ^= 0x01
            self._manifests[snapshot_id] = bytes(raw)


if TYPE_CHECKING:  # mypy proves the in-memory store fits what consumers and the writer see

    def _fits(
        store: MemoryStore,
    ) -> tuple[ChunkReader, ChunkWriter, BackupStore, SnapshotHost]:
        return store, store, store, store
