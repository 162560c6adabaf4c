"""Importing a snapshot replicated from another site (the receiving half of replication).

The receiver has already put every record through ``Store.put``; ``SnapshotImport`` then
publishes the snapshot in the store's commit order (DESIGN §4.1)::

    stage_diskmap()  a DiskMap's bytes → snapshots/<id>/<name>.tmp, fsynced
    commit()         store.flush()                 records sealed, index entries durable
                     manifest MAC checked          with this store's mac-key (shared keys)
                     DiskMaps checked               against the manifest's checksums, and
                                                    every chunk they name is stored
                     DiskMaps renamed, dirs fsynced
                     manifest                       tmp+fsync+rename+fsync dir ← commit point
                     catalog

Until ``commit`` the snapshot directory holds only ``.tmp`` files, which open = recover
deletes with the directory, so a broken session never leaves a restore point behind. The
caller holds a lease (``Store.lease`` / ``leases.begin``) from before it told the sender
which chunks it has until the commit returns, so GC keeps every chunk the snapshot names.
"""

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.errors import ChunkMissing, SnapshotNotFound, StoreError
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.store import manifest as manifest_mod
from engine.store.diskmap import DiskMap
from engine.store.manifest import Manifest
from engine.util.fs import TMP_SUFFIX, fsync_dir, write_all

if TYPE_CHECKING:
    from engine.store.chunk_store import Store

_DISKMAP_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}\.dmap$")
_SNAPSHOT_ID: Final = re.compile(r"^[0-9a-f]{8,64}$")


def check_snapshot_id(snapshot_id: str) -> None:
    if not _SNAPSHOT_ID.match(snapshot_id):
        raise SnapshotNotFound(snapshot=snapshot_id[:80], reason="not a snapshot id")


class SnapshotImport:
    """One replicated snapshot being received. Not thread-safe: one session owns it."""

    def __init__(self, store: "Store", snapshot_id: str):
        check_snapshot_id(snapshot_id)
        if not store.writable:
            raise StoreError(path=store.path, reason="opened read-only")
        self._store = store
        self.snapshot_id = snapshot_id
        self.dir: Path = store.layout.snapshot_dir(snapshot_id)
        self.staged: dict[str, Path] = {}

    @property
    def committed(self) -> bool:
        return self._store.layout.manifest(self.snapshot_id).exists()

    def stage_diskmap(self, name: str, data: bytes) -> None:
        """Write one DiskMap's bytes durably beside the (future) manifest, as a temp file."""
        if not _DISKMAP_NAME.match(name):
            raise StoreError(path=self._store.path, reason=f"bad DiskMap name {name[:80]!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.staged[name] = tmp

    def commit(self, raw_manifest: bytes) -> Manifest:
        """Verify and publish; returns the manifest. Idempotent for a committed snapshot.

        Raises ManifestTampered (MAC: the stores do not share keys, or the bytes changed),
        CorruptDiskMap, ChunkMissing (naming the first missing chunk and the count) or
        StoreError; nothing is published then."""
        store = self._store
        where = f"(replicated {self.snapshot_id})"
        manifest = manifest_mod.decode(raw_manifest, store.keys, self.snapshot_id, where)
        if self.committed:
            return manifest
        if manifest.chunk_size != store.config.chunk_size:
            raise StoreError(
                path=store.path,
                reason=f"snapshot {self.snapshot_id} has {manifest.chunk_size}-byte chunks, "
                f"this store {store.config.chunk_size}",
            )
        store.flush()
        missing, first = 0, b""
        needed = [bytes.fromhex(manifest.config.chunk_id)] if manifest.config else []
        for disk in manifest.disks:
            tmp = self.staged.get(disk.diskmap)
            if tmp is None:
                raise StoreError(
                    path=store.path,
                    reason=f"snapshot {self.snapshot_id}: DiskMap {disk.diskmap} not received",
                )
            with DiskMap(tmp, bytes.fromhex(disk.diskmap_checksum)) as dm:
                for block in dm.iter_blocks():
                    prev = b""
                    for i in range(0, len(block), CHUNK_ID_SIZE):
                        cid = block[i : i + CHUNK_ID_SIZE]
                        if cid not in (ZERO_ID, prev) and not self._present(cid):
                            missing, first = missing + 1, first or cid
                        prev = cid
        for cid in needed:
            if not self._present(cid):
                missing, first = missing + 1, first or cid
        if missing:
            raise ChunkMissing(
                chunk=short(first),
                context=f" (snapshot {self.snapshot_id} references {missing} missing chunks)",
            )
        for disk in manifest.disks:
            os.rename(self.staged[disk.diskmap], self.dir / disk.diskmap)
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)
        store.commit_manifest(manifest)
        return manifest

    def _present(self, chunk_id: bytes) -> bool:
        # Indexed = durable (after the flush, every record put so far is). A condemned chunk
        # is still indexed and the caller's lease keeps GC from deleting it; the committed
        # manifest makes the next GC absolve it.
        return self._store.index.lookup(chunk_id) is not None

    def abort(self) -> None:
        """Drop what was staged (never a committed snapshot)."""
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.staged.clear()
