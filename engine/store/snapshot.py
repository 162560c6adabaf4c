"""``SnapshotWriter``: collects one VM's DiskMaps and config, then commits the manifest.

Commit order (DESIGN §4.1, never changed):

    store.flush()            every record sealed in a pack, index entries durable
    DiskMapWriter.finish()   each DiskMap fsynced and renamed into the snapshot directory
    fsync snapshot dirs      the directory entries are durable too
    manifest                 tmp + fsync + rename + fsync dir  ← the commit point
    catalog                  cache update (repaired on open if a crash skips it)

Until the manifest exists the snapshot directory is garbage that recovery deletes, so a
failed or killed backup never becomes a restore point.

The writer sees the store through ``SnapshotHost``, the part of ``Store`` it uses, so this
module does not import ``chunk_store`` (which imports it to hand out writers; mypy checks
that ``Store`` fits where ``Store.begin_snapshot`` passes itself).
"""

import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from engine.core.ids import ChunkId
from engine.store import format as fmt
from engine.store.diskmap import DiskMapWriter
from engine.store.failure import write_failure
from engine.store.layout import Layout, StoreConfig
from engine.store.leases import LeaseRegistry
from engine.store.manifest import ConfigStream, DiskEntry, Manifest
from engine.util import failpoints
from engine.util.fs import fsync_dir


class SnapshotHost(Protocol):
    """What a ``SnapshotWriter`` needs of the store it commits into (a writable ``Store``)."""

    @property
    def path(self) -> Path: ...  # named in write failures

    @property
    def layout(self) -> Layout: ...

    @property
    def config(self) -> StoreConfig: ...

    @property
    def leases(self) -> LeaseRegistry: ...

    def write_token(self) -> int: ...

    def put_chunk(self, plain: bytes) -> ChunkId: ...

    def flush(self, since: int | None = None) -> None: ...

    def commit_manifest(self, manifest: Manifest) -> None: ...


class SnapshotWriter:
    def __init__(
        self,
        store: SnapshotHost,
        vm_id: str,
        vm_name: str,
        level: str,
        parent: str | None,
        time: datetime | None,
    ):
        self._store = store
        self.snapshot_id = secrets.token_hex(8)
        self.vm_id = vm_id
        self.vm_name = vm_name
        self.level = level
        self.parent = parent
        self.time = (time or datetime.now(UTC)).astimezone(UTC)
        self.dir: Path = store.layout.snapshot_dir(self.snapshot_id)
        # The lease tells GC a session may reference chunks no manifest names yet; it ends
        # once the manifest is committed or the snapshot aborted.
        self._lease = store.leases.begin("backup", self.snapshot_id)
        # Packs the store abandons from now on (a failed write) may hold records this
        # snapshot deduplicated against: commit refuses then (``Store.flush(since=…)``).
        self._token = store.write_token()
        try:
            self.dir.mkdir(parents=True)
        except OSError as e:
            store.leases.end(self._lease)
            raise write_failure(store.path, f"snapshot directory {self.dir.name}", e) from e
        except BaseException:
            store.leases.end(self._lease)
            raise
        self._disks: list[tuple[DiskMapWriter, str, str, dict[str, str]]] = []
        self._config: ConfigStream | None = None
        self._done = False

    def add_disk(
        self, disk_id: str, name: str, size: int, attributes: dict[str, str] | None = None
    ) -> DiskMapWriter:
        """A DiskMap writer for one disk; the caller sets every slot before commit."""
        path = self.dir / f"disk-{len(self._disks)}.dmap"
        try:
            writer = DiskMapWriter(path, size, self._store.config.chunk_size, self._store.path)
        except OSError as e:
            raise write_failure(self._store.path, f"DiskMap {self.dir.name}/{path.name}", e) from e
        self._disks.append((writer, disk_id, name, dict(attributes or {})))
        return writer

    def annotate(self, writer: DiskMapWriter, attributes: dict[str, str]) -> None:
        """Add source facts to a disk's manifest entry (e.g. why it was read fully)."""
        for w, _disk_id, _name, attrs in self._disks:
            if w is writer:
                attrs.update(attributes)
                return
        raise ValueError(f"{writer.path} is not a disk of snapshot {self.snapshot_id}")

    def set_config(self, format_name: str, data: bytes) -> None:
        """Save the VM configuration (e.g. OVF) as one chunk of the store."""
        if len(data) > fmt.MAX_CHUNK_SIZE:
            raise ValueError(f"VM configuration of {len(data)} bytes is too large")
        chunk_id = self._store.put_chunk(data)
        self._config = ConfigStream(format=format_name, chunk_id=chunk_id.hex(), size=len(data))

    def commit(
        self, consistency: str | None = None, tags: dict[str, str] | None = None
    ) -> Manifest:
        """Make the snapshot durable and visible; returns its manifest."""
        if self._done:
            raise RuntimeError(f"snapshot {self.snapshot_id} already committed or aborted")
        try:
            self._store.flush(since=self._token)
            failpoints.hit("store.snapshot.after_flush")
            entries = []
            for writer, disk_id, name, attributes in self._disks:
                try:
                    checksum = writer.finish()
                except OSError as e:
                    what = f"DiskMap {self.dir.name}/{writer.path.name}"
                    raise write_failure(self._store.path, what, e) from e
                entries.append(
                    DiskEntry(
                        disk_id=disk_id,
                        name=name,
                        size=writer.disk_size,
                        diskmap=writer.path.name,
                        diskmap_checksum=checksum.hex(),
                        data_bytes=writer.data_bytes,
                        attributes=attributes,
                    )
                )
            try:
                fsync_dir(self.dir, "store.snapshot.before_dir_fsync")
                fsync_dir(self.dir.parent)
            except OSError as e:
                raise write_failure(self._store.path, f"snapshot {self.snapshot_id}", e) from e
            failpoints.hit("store.snapshot.before_manifest")
            manifest = Manifest(
                format=fmt.FORMAT_VERSION,
                snapshot_id=self.snapshot_id,
                store_id=self._store.config.store_id,
                vm_id=self.vm_id,
                vm_name=self.vm_name,
                time=self.time.isoformat(timespec="microseconds"),
                level=self.level,
                parent=self.parent,
                chunk_size=self._store.config.chunk_size,
                disks=tuple(entries),
                config=self._config,
                consistency=consistency,
                tags=dict(tags or {}),
            )
            self._store.commit_manifest(manifest)
        except BaseException:
            if not self._store.layout.manifest(self.snapshot_id).exists():
                self.abort()
            raise
        finally:
            self._store.leases.end(self._lease)
        self._done = True
        return manifest

    def abort(self) -> None:
        """Discard everything written for this snapshot (chunks stay; GC takes them)."""
        for writer, *_ in self._disks:
            writer.abort()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._store.leases.end(self._lease)
        self._done = True

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._done:
            self.abort()
