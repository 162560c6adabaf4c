"""DiskMaps: one per disk per snapshot, one ChunkId per slot (PBS's fixed index).

Slot i covers bytes ``[i·C, (i+1)·C)`` of the disk (the last slot may be short). The file is
a 64-byte header (chunk size, disk size, slot count, BLAKE3 of the id array) followed by the
ids; layout in ``format``. ``ZERO_ID`` (all zero bytes) marks an all-zero slot, so a fresh
sparse file already holds "every slot zero" and the writer only writes data slots.

The writer accepts slots in any order (readers complete out of order) with ``pwrite`` at the
slot's position, so memory is one byte per slot for completion tracking, never the ids.
``finish()`` refuses to publish a map with a slot nobody set: a missed slot must be a loud
bug, not a silent zero. The manifest records the id checksum, so a DiskMap swapped or edited
on disk is detected when opened through its manifest.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import blake3

from engine.core.errors import CorruptDiskMap
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, ChunkId
from engine.store import format as fmt
from engine.store.failure import write_failure
from engine.util import failpoints
from engine.util.fs import TMP_SUFFIX, fsync_dir, pwrite_all

_IO_BLOCK: Final = 32 * 1024  # ids per read/hash step: 1 MiB, bounded memory for any disk


def slot_count(disk_size: int, chunk_size: int) -> int:
    return -(-disk_size // chunk_size)


def _checksum_prefix(chunk_size: int, disk_size: int) -> bytes:
    """The header fields the checksum covers, so a changed disk size is detected too."""
    return fmt.DISKMAP_CHECKSUM_PREFIX.pack(
        chunk_size, disk_size, slot_count(disk_size, chunk_size)
    )


def checksum_of(chunk_size: int, disk_size: int, ids: bytes) -> bytes:
    return blake3.blake3(_checksum_prefix(chunk_size, disk_size) + ids).digest()


def pack_header(chunk_size: int, disk_size: int, checksum: bytes) -> bytes:
    header = fmt.DISKMAP_HEADER.pack(
        fmt.DISKMAP_MAGIC,
        fmt.FORMAT_VERSION,
        chunk_size,
        disk_size,
        slot_count(disk_size, chunk_size),
        checksum,
    )
    return header.ljust(fmt.DISKMAP_HEADER_SIZE, b"\0")


def encode(chunk_size: int, disk_size: int, ids: bytes) -> bytes:
    """A whole DiskMap in memory (small maps and tests; the writer streams)."""
    if len(ids) != slot_count(disk_size, chunk_size) * CHUNK_ID_SIZE:
        raise ValueError("id array does not match the slot count")
    return pack_header(chunk_size, disk_size, checksum_of(chunk_size, disk_size, ids)) + ids


def parse_header(raw: bytes, path: Path | str) -> tuple[int, int, int, bytes]:
    """(chunk size, disk size, slots, checksum) from a header; raises CorruptDiskMap."""
    if len(raw) < fmt.DISKMAP_HEADER_SIZE:
        raise CorruptDiskMap(path=path, reason="shorter than its header")
    magic, version, chunk_size, disk_size, slots, checksum = fmt.DISKMAP_HEADER.unpack_from(raw)
    if magic != fmt.DISKMAP_MAGIC:
        raise CorruptDiskMap(path=path, reason="bad magic")
    if version != fmt.FORMAT_VERSION:
        raise CorruptDiskMap(path=path, reason=f"unknown format version {version}")
    if any(raw[5:8]) or any(raw[fmt.DISKMAP_HEADER.size : fmt.DISKMAP_HEADER_SIZE]):
        raise CorruptDiskMap(path=path, reason="reserved header bytes are not zero")
    if not fmt.MIN_CHUNK_SIZE <= chunk_size <= fmt.MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1):
        raise CorruptDiskMap(path=path, reason=f"bad chunk size {chunk_size}")
    if slots != slot_count(disk_size, chunk_size):
        raise CorruptDiskMap(path=path, reason="slot count does not match disk size")
    return chunk_size, disk_size, slots, checksum


def decode(raw: bytes, path: Path | str = "(memory)") -> tuple[int, int, bytes]:
    """(chunk size, disk size, ids) from a whole DiskMap; raises CorruptDiskMap."""
    chunk_size, disk_size, slots, checksum = parse_header(raw, path)
    ids = raw[fmt.DISKMAP_HEADER_SIZE :]
    if len(ids) != slots * CHUNK_ID_SIZE:
        raise CorruptDiskMap(path=path, reason="truncated or extended id array")
    if checksum_of(chunk_size, disk_size, ids) != checksum:
        raise CorruptDiskMap(path=path, reason="id array checksum mismatch")
    return chunk_size, disk_size, ids


class DiskMapWriter:
    """Build a DiskMap at ``path`` slot by slot, then publish it atomically.

    A failed write raises ``StoreWriteError`` naming the store (``root``) and the map; the
    caller aborts the snapshot."""

    def __init__(self, path: Path, disk_size: int, chunk_size: int, root: Path | None = None):
        self.path = path
        self._root = root if root is not None else path.parent
        self.disk_size = disk_size
        self.chunk_size = chunk_size
        self.slots = slot_count(disk_size, chunk_size)
        self._tmp = path.with_name(path.name + TMP_SUFFIX)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, fmt.DISKMAP_HEADER_SIZE + self.slots * CHUNK_ID_SIZE)
        self._done = bytearray(self.slots)  # 1 byte per slot: 1/32 of the map itself
        self.data_bytes = 0  # bytes covered by non-zero slots

    def set(self, slot: int, chunk_id: bytes) -> None:
        if not 0 <= slot < self.slots or len(chunk_id) != CHUNK_ID_SIZE:
            raise ValueError(f"{self.path}: bad slot {slot} or id length {len(chunk_id)}")
        if self._done[slot]:
            raise ValueError(f"{self.path}: slot {slot} set twice")
        if chunk_id != ZERO_ID:
            # Checked in full: a short write would leave zeros, which read as the ZERO id.
            try:
                pwrite_all(
                    self._fd,
                    chunk_id,
                    fmt.DISKMAP_HEADER_SIZE + slot * CHUNK_ID_SIZE,
                    failpoint="store.diskmap.mid_write",
                )
            except OSError as e:
                what = f"DiskMap {self.path.parent.name}/{self.path.name}"
                raise write_failure(self._root, what, e) from e
            self.data_bytes += min(self.chunk_size, self.disk_size - slot * self.chunk_size)
        self._done[slot] = 1

    def set_zero(self, start: int, count: int) -> None:
        """Mark ``count`` slots from ``start`` as ZERO (no write: the file is zero-filled)."""
        if not (start >= 0 and start + count <= self.slots):
            raise ValueError(f"{self.path}: zero range {start}+{count} outside the map")
        if any(self._done[start : start + count]):
            raise ValueError(f"{self.path}: zero range {start}+{count} overlaps set slots")
        self._done[start : start + count] = b"\x01" * count

    def missing(self) -> int:
        return self._done.count(0)

    def finish(self) -> bytes:
        """Checksum, header, fsync, publish. Returns the id checksum for the manifest."""
        if (missing := self.missing()) != 0:
            raise ValueError(f"{self.path}: {missing} slots were never set")
        hasher = blake3.blake3(_checksum_prefix(self.chunk_size, self.disk_size))
        pos = fmt.DISKMAP_HEADER_SIZE
        end = pos + self.slots * CHUNK_ID_SIZE
        while pos < end:
            block = os.pread(self._fd, min(_IO_BLOCK * CHUNK_ID_SIZE, end - pos), pos)
            hasher.update(block)
            pos += len(block)
        checksum = hasher.digest()
        pwrite_all(self._fd, pack_header(self.chunk_size, self.disk_size, checksum), 0)
        failpoints.hit("store.diskmap.before_fsync")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        failpoints.hit("store.diskmap.before_rename")
        os.replace(self._tmp, self.path)
        failpoints.hit("store.diskmap.after_rename")
        fsync_dir(self.path.parent, "store.diskmap.before_dir_fsync")
        return checksum

    def abort(self) -> None:
        """Drop the unpublished map; quiet on failure paths (the snapshot directory goes)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            self._tmp.unlink(missing_ok=True)


class DiskMap:
    """A published DiskMap, read with bounded memory. Use as a context manager."""

    def __init__(self, path: Path, expected_checksum: bytes | None = None):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            header = os.pread(self._fd, fmt.DISKMAP_HEADER_SIZE, 0)
            self.chunk_size, self.disk_size, self.slots, self.checksum = parse_header(header, path)
            if expected_checksum is not None and expected_checksum != self.checksum:
                raise CorruptDiskMap(path=path, reason="checksum differs from its manifest")
            size = os.fstat(self._fd).st_size
            if size != fmt.DISKMAP_HEADER_SIZE + self.slots * CHUNK_ID_SIZE:
                raise CorruptDiskMap(path=path, reason=f"file is {size} bytes, not as declared")
            self._verify()
        except BaseException:
            os.close(self._fd)
            raise

    def _verify(self) -> None:
        hasher = blake3.blake3(_checksum_prefix(self.chunk_size, self.disk_size))
        for block in self.iter_blocks():
            hasher.update(block)
        if hasher.digest() != self.checksum:
            raise CorruptDiskMap(path=self.path, reason="id array checksum mismatch")

    def __enter__(self) -> "DiskMap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def get(self, slot: int) -> ChunkId:
        if not 0 <= slot < self.slots:
            raise IndexError(f"{self.path}: slot {slot} outside 0..{self.slots - 1}")
        return ChunkId(
            os.pread(self._fd, CHUNK_ID_SIZE, fmt.DISKMAP_HEADER_SIZE + slot * CHUNK_ID_SIZE)
        )

    def ids(self, start: int, count: int) -> bytes:
        """The ids of slots ``[start, start + count)`` (clipped to the map) as one bytes
        object of 32 bytes per slot; one ``pread`` (an NBD export reads them per request)."""
        if not 0 <= start <= self.slots or count < 0:
            raise IndexError(f"{self.path}: slots {start}+{count} outside 0..{self.slots}")
        count = min(count, self.slots - start)
        raw = os.pread(
            self._fd, count * CHUNK_ID_SIZE, fmt.DISKMAP_HEADER_SIZE + start * CHUNK_ID_SIZE
        )
        if len(raw) != count * CHUNK_ID_SIZE:
            raise CorruptDiskMap(path=self.path, reason="file shrank while reading")
        return raw

    def iter_blocks(self, start: int = 0) -> Iterator[bytes]:
        """The id array from slot ``start`` in blocks of up to 32 Ki ids."""
        pos = fmt.DISKMAP_HEADER_SIZE + start * CHUNK_ID_SIZE
        end = fmt.DISKMAP_HEADER_SIZE + self.slots * CHUNK_ID_SIZE
        while pos < end:
            block = os.pread(self._fd, min(_IO_BLOCK * CHUNK_ID_SIZE, end - pos), pos)
            if not block:
                raise CorruptDiskMap(path=self.path, reason="file shrank while reading")
            yield block
            pos += len(block)

    def iter_ids(self) -> Iterator[tuple[int, ChunkId]]:
        """(slot, id) for every slot, in order."""
        slot = 0
        for block in self.iter_blocks():
            for i in range(0, len(block), CHUNK_ID_SIZE):
                yield slot, ChunkId(block[i : i + CHUNK_ID_SIZE])
                slot += 1
