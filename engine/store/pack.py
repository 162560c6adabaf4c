"""Packs: append-only files of records, sealed once and never changed.

Life of a pack::

    packs/tmp/<name>.pack.tmp   open: header, then records appended as they come
          │  seal(): trailer + footer → fsync(file) → rename → fsync(dir)
          ▼
    packs/<nn>/<name>.pack      sealed: immutable; the trailer lists every record

A crash before the rename leaves only a ``.tmp`` file, which the next open deletes (its
chunks were never referenced by a committed manifest: manifests are written after the packs
they use are sealed). Pack names are 32 random hex digits; ``<nn>`` is their first two, to
keep directories small.
"""

import contextlib
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.core.errors import CorruptPack
from engine.core.ids import ChunkId
from engine.store import format as fmt
from engine.util import failpoints
from engine.util.fs import TMP_SUFFIX, fsync_dir, pwrite_all

PACK_SUFFIX: Final = ".pack"


@dataclass(frozen=True, slots=True)
class PackEntry:
    chunk_id: ChunkId
    offset: int
    length: int
    plain_len: int


@dataclass(frozen=True)
class SealedPack:
    name: str
    size: int
    entries: list[PackEntry]


def pack_path(packs_dir: Path, name: str) -> Path:
    return packs_dir / name[:2] / (name + PACK_SUFFIX)


def new_pack_name() -> str:
    return secrets.token_hex(fmt.PACK_ID_SIZE)


class PackWriter:
    """One open pack. Not thread-safe: the chunk store serialises appends.

    Every write goes to an explicit offset (``pwrite``) computed from ``size``, which counts
    only bytes known written. A write, fsync or rename that fails *poisons* the writer
    (``broken`` is the error): it refuses every later append and seal, because a torn record
    or a page the kernel dropped after a failed fsync may sit anywhere in it. The owner then
    ``abort()``s it — its records were never indexed, so nothing refers to them.
    """

    def __init__(self, packs_dir: Path, name: str | None = None):
        self.name = name or new_pack_name()
        self._packs_dir = packs_dir
        self._tmp = packs_dir / "tmp" / (self.name + PACK_SUFFIX + TMP_SUFFIX)
        self._tmp.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd_lock = threading.Lock()  # read() may race with seal() closing the fd
        self.entries: list[PackEntry] = []
        self.broken: BaseException | None = None
        self.published = False  # renamed to its final name (seal got past the rename)
        self.size = 0
        header = fmt.PACK_HEADER.pack(fmt.PACK_MAGIC, fmt.FORMAT_VERSION, bytes.fromhex(self.name))
        self._write(header, None)
        self.size = len(header)

    def _write(self, data: bytes | bytearray | memoryview, failpoint: str | None) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            pwrite_all(self._fd, data, self.size, failpoint=failpoint)
        except BaseException as e:
            self.broken = e
            raise

    def append(
        self, chunk_id: ChunkId, record: bytes | bytearray | memoryview, plain_len: int
    ) -> int:
        """Append one record; returns its offset. The record must already be verified."""
        offset, length = self.size, len(record)  # before the write: the caller's buffer
        self._write(record, "store.record.mid_write")  # may be gone once it returns
        self.size += length
        self.entries.append(PackEntry(chunk_id, offset, length, plain_len))
        failpoints.hit("store.record.after_write")
        return offset

    def read(self, offset: int, length: int) -> bytes:
        """Read back a record of this pack, whether still open, sealing or sealed."""
        with self._fd_lock:
            if self._fd >= 0:
                return os.pread(self._fd, length, offset)
        with pack_path(self._packs_dir, self.name).open("rb") as f:
            f.seek(offset)
            return f.read(length)

    def seal(self) -> SealedPack:
        """Write the trailer and publish the pack durably under its final name.

        Raises the ``OSError`` of a failed write, fsync or rename; the writer is broken then
        (``published`` says whether the final name exists: a failure of the last directory
        fsync leaves a complete pack that is not known durable)."""
        if self.broken is not None:
            raise self.broken
        try:
            failpoints.hit("store.pack.before_trailer")
            trailer = b"".join(
                fmt.TRAILER_ENTRY.pack(e.chunk_id, e.offset, e.length, e.plain_len)
                for e in self.entries
            )
            footer = fmt.PACK_FOOTER.pack(
                fmt.PACK_FOOTER_MAGIC,
                fmt.FORMAT_VERSION,
                len(self.entries),
                fmt.crc32(trailer),
                self.size,
            )
            pwrite_all(self._fd, trailer + footer, self.size, failpoint="store.pack.mid_trailer")
            size = self.size + len(trailer) + len(footer)
            failpoints.hit("store.pack.before_fsync")
            os.fsync(self._fd)
            final = pack_path(self._packs_dir, self.name)
            new_shard = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            if new_shard:
                fsync_dir(self._packs_dir, "store.pack.before_shard_fsync")
            failpoints.hit("store.pack.before_rename")
            with self._fd_lock:
                os.rename(self._tmp, final)
                self.published = True
                os.close(self._fd)
                self._fd = -1
            failpoints.hit("store.pack.after_rename")
            fsync_dir(final.parent, "store.pack.before_dir_fsync")
            failpoints.hit("store.pack.after_dir_fsync")
        except BaseException as e:
            self.broken = e
            raise
        return SealedPack(self.name, size, self.entries)

    def abort(self) -> None:
        """Drop an unpublished pack (its records were never indexed). Idempotent and quiet:
        it runs on failure paths, where the disk may refuse even an unlink. A pack already
        published is left in place (complete; the next open indexes it from its trailer, and
        GC reclaims what nothing references)."""
        with self._fd_lock:
            if self._fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = -1
        if not self.published:
            with contextlib.suppress(OSError):
                self._tmp.unlink(missing_ok=True)


def read_trailer(path: Path, name: str) -> tuple[int, list[PackEntry]]:
    """Read a sealed pack's trailer: (file size, entries). Raises CorruptPack naming it."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < fmt.PACK_HEADER.size + fmt.PACK_FOOTER.size:
                raise CorruptPack(pack=name, reason=f"only {size} bytes long")
            check_header(name, f.read(fmt.PACK_HEADER.size))
            f.seek(size - fmt.PACK_FOOTER.size)
            count, crc, trailer_offset = parse_footer(name, size, f.read(fmt.PACK_FOOTER.size))
            f.seek(trailer_offset)
            trailer = f.read(count * fmt.TRAILER_ENTRY.size)
    except OSError as e:
        raise CorruptPack(pack=name, reason=f"unreadable: {e}") from e
    return size, parse_trailer(name, trailer, crc, trailer_offset)


def check_header(name: str, header: bytes) -> None:
    """CorruptPack unless ``header`` is the header of pack ``name``."""
    magic, version, pack_id = fmt.PACK_HEADER.unpack(header)
    if magic != fmt.PACK_MAGIC or version != fmt.FORMAT_VERSION:
        raise CorruptPack(pack=name, reason="bad pack header")
    if pack_id.hex() != name:
        raise CorruptPack(pack=name, reason=f"header names pack {pack_id.hex()}")


def parse_footer(name: str, size: int, footer: bytes) -> tuple[int, int, int]:
    """(record count, trailer CRC32, trailer offset) from the footer of a ``size``-byte pack;
    CorruptPack if it is not one or does not fit the size."""
    if size < fmt.PACK_HEADER.size + fmt.PACK_FOOTER.size:
        raise CorruptPack(pack=name, reason=f"only {size} bytes long")
    fmagic, fversion, count, crc, trailer_offset = fmt.PACK_FOOTER.unpack(footer)
    if fmagic != fmt.PACK_FOOTER_MAGIC or fversion != fmt.FORMAT_VERSION:
        raise CorruptPack(pack=name, reason="bad or missing trailer (truncated?)")
    trailer_len = count * fmt.TRAILER_ENTRY.size
    if trailer_offset + trailer_len + fmt.PACK_FOOTER.size != size:
        raise CorruptPack(pack=name, reason="trailer does not fit the file size")
    return count, crc, trailer_offset


def parse_trailer(name: str, trailer: bytes, crc: int, trailer_offset: int) -> list[PackEntry]:
    """The entries of a trailer whose footer ``parse_footer`` read; CorruptPack if its CRC
    or its record offsets are wrong."""
    if fmt.crc32(trailer) != crc:
        raise CorruptPack(pack=name, reason="trailer CRC32 mismatch")
    entries = []
    end = fmt.PACK_HEADER.size
    for cid, offset, length, plain_len in fmt.TRAILER_ENTRY.iter_unpack(trailer):
        if offset != end:
            raise CorruptPack(pack=name, reason=f"trailer entry at offset {offset} out of order")
        end = offset + length
        entries.append(PackEntry(ChunkId(cid), offset, length, plain_len))
    if end != trailer_offset:
        raise CorruptPack(pack=name, reason="records do not end where the trailer begins")
    return entries
