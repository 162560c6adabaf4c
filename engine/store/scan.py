"""Scan a pack's records when its trailer cannot be trusted.

Records are self-describing (``format``: magic, lengths, chunk id, CRC32 over the record),
so the trailer is a convenience, not the truth. ``scan_pack`` walks a pack from its header::

    PACK_HEADER │ record │ record │ ??????? │ record │ … │ trailer │ footer
                  ok       ok       bad:      ok
                                    search forward for the next ``RECORD_MAGIC`` whose
                                    header parses and whose CRC32 holds; resume there

Each record must parse (magic, version, flags, lengths within the format's limits), fit in
the file and hold its CRC32; with a ``decode`` callback (the store's codec, when the data
key is there) it must also open (AES-GCM) and re-hash to its id. A record whose framing and
CRC hold but that fails ``decode`` is skipped by its own length; anything else that fails
starts a resynchronisation. Every record that checks out is kept; every byte range that
does not is reported as ``Lost`` with the chunk id its header or the trailer names, where
one does. The bytes after the last intact record are the trailer and footer when their
length is what a trailer of the intact records takes, else they are reported lost too.

Memory is bounded: the file is memory-mapped and read one record at a time.
"""

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from engine.core.errors import CorruptPack, IntegrityError
from engine.core.ids import ChunkId, short
from engine.store import format as fmt
from engine.store.pack import PackEntry, read_trailer

# The largest payload a record of the format can carry (an 8 MiB chunk stored as is, sealed).
_MAX_PAYLOAD: Final = fmt.NONCE_SIZE + fmt.MAX_CHUNK_SIZE + fmt.TAG_SIZE

Decode = Callable[[bytes, ChunkId, str, int], object]  # raises IntegrityError


@dataclass(frozen=True)
class Lost:
    """A byte range of a pack that holds no intact record."""

    offset: int
    length: int
    chunk: ChunkId | None  # the chunk its header or the trailer names (may itself be damaged)
    reason: str

    def line(self) -> str:
        who = f"chunk {short(self.chunk)}" if self.chunk else "unknown chunk"
        return f"{self.length} bytes at offset {self.offset} ({who}): {self.reason}"


@dataclass
class PackScan:
    name: str
    size: int
    header: str | None = None  # why the pack header is wrong (None: it is right)
    trailer: str | None = None  # why the trailer cannot be trusted (None: it matches)
    entries: list[PackEntry] = field(default_factory=list)  # intact records, in file order
    lost: list[Lost] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.entries)} intact records"]
        if self.lost:
            parts.append(f"{len(self.lost)} damaged ranges")
        return ", ".join(parts)


def scan_pack(path: Path, name: str, decode: Decode | None = None) -> PackScan:
    """Scan the pack at ``path`` (named ``name``) record by record; see the module docstring.
    Raises ``CorruptPack`` only when the file cannot be read at all."""
    try:
        hints: dict[int, ChunkId] = {}
        records_end: int | None = None
        try:
            size, good = read_trailer(path, name)
            trailer: str | None = None
            hints = {e.offset: e.chunk_id for e in good}
            records_end = size - fmt.PACK_FOOTER.size - len(good) * fmt.TRAILER_ENTRY.size
        except CorruptPack as e:
            trailer = str(e.fields["reason"])
            good = []
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return PackScan(name, 0, "empty file", "missing", [], [])
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                if records_end is None:
                    hints, records_end = _trailer_hints(buf, size)
                scan = _scan(buf, size, records_end, name, decode, hints)
    except OSError as e:
        raise CorruptPack(pack=name, reason=f"unreadable: {e}") from e
    scan.trailer = trailer
    if trailer is None and [(e.offset, e.length) for e in good] != [
        (e.offset, e.length) for e in scan.entries
    ]:
        scan.trailer = "trailer does not match the records"
    return scan


def _scan(
    buf: mmap.mmap,
    size: int,
    records_end: int | None,
    name: str,
    decode: Decode | None,
    hints: dict[int, ChunkId],
) -> PackScan:
    """Walk the records to the end of the file; then the bytes from ``records_end`` (where a
    readable footer says the trailer begins) on are the trailer, or, without a readable
    footer, ``_classify_tail`` decides."""
    scan = PackScan(name, size)
    limit = size
    if size < fmt.PACK_HEADER.size:
        scan.header = f"only {size} bytes long"
        return scan
    magic, version, pack_id = fmt.PACK_HEADER.unpack(buf[: fmt.PACK_HEADER.size])
    if magic != fmt.PACK_MAGIC or version != fmt.FORMAT_VERSION:
        scan.header = "bad pack header"
    elif pack_id.hex() != name:
        scan.header = f"header names pack {pack_id.hex()}"
    pos = fmt.PACK_HEADER.size
    while pos < limit:
        found = _record_at(buf, pos, limit)
        if isinstance(found, str):  # not a record here: resynchronise
            nxt = _resync(buf, pos + 1, limit)
            end = limit if nxt is None else nxt
            scan.lost.append(Lost(pos, end - pos, _named(buf, pos, hints), found))
            pos = end
            continue
        cid, length, plain_len = found
        if decode is not None:
            try:
                decode(buf[pos : pos + length], cid, name, pos)
            except IntegrityError as e:
                scan.lost.append(Lost(pos, length, cid, str(e)))
                pos += length
                continue
        scan.entries.append(PackEntry(cid, pos, length, plain_len))
        pos += length
    if records_end is None:
        _classify_tail(scan)
    else:  # lost ranges are cut at the trailer: it is no record
        scan.lost = [
            Lost(x.offset, min(x.length, records_end - x.offset), x.chunk, x.reason)
            for x in scan.lost
            if x.offset < records_end
        ]
    return scan


def _classify_tail(scan: PackScan) -> None:
    """The last lost range is the trailer (and footer) when its length is that of a trailer
    of the intact records and no intact record follows it: not a loss."""
    if not scan.lost:
        return
    tail = scan.lost[-1]
    after = scan.entries[-1].offset + scan.entries[-1].length if scan.entries else 0
    trailer_size = len(scan.entries) * fmt.TRAILER_ENTRY.size + fmt.PACK_FOOTER.size
    if tail.offset >= after and tail.offset + tail.length == scan.size:
        if tail.length == trailer_size:
            scan.lost.pop()
        elif tail.length > trailer_size:  # records may have been lost before the trailer
            scan.lost[-1] = Lost(
                tail.offset,
                tail.length - trailer_size,
                tail.chunk,
                f"{tail.reason}; the bytes before the trailer hold no intact record",
            )


def _record_at(buf: mmap.mmap, pos: int, size: int) -> tuple[ChunkId, int, int] | str:
    """(chunk id, record length, plaintext length) of the intact record at ``pos``, or why
    there is none."""
    end_header = pos + fmt.RECORD_HEADER.size
    if end_header + fmt.RECORD_CRC.size > size:
        return "no record header fits before the end of the file"
    magic, version, flags, reserved, plain_len, payload_len, cid = fmt.RECORD_HEADER.unpack(
        buf[pos:end_header]
    )
    body_end = end_header + payload_len
    problem = (
        "bad record magic"
        if magic != fmt.RECORD_MAGIC
        else "bad record header"
        if version != fmt.FORMAT_VERSION or flags & ~fmt.KNOWN_FLAGS or reserved
        else "record lengths out of range"
        if plain_len > fmt.MAX_CHUNK_SIZE or payload_len > _MAX_PAYLOAD
        else "record runs past the end of the file"
        if body_end + fmt.RECORD_CRC.size > size
        else None
    )
    if problem is not None:
        return problem
    (crc,) = fmt.RECORD_CRC.unpack(buf[body_end : body_end + fmt.RECORD_CRC.size])
    if fmt.crc32(buf[pos:body_end]) != crc:
        return "CRC32 mismatch"
    return ChunkId(cid), body_end + fmt.RECORD_CRC.size - pos, plain_len


def _resync(buf: mmap.mmap, start: int, size: int) -> int | None:
    """Offset of the next record magic at or after ``start`` that begins an intact record."""
    pos = start
    while (pos := buf.find(fmt.RECORD_MAGIC, pos, size)) >= 0:
        if not isinstance(_record_at(buf, pos, size), str):
            return pos
        pos += 1
    return None


def _named(buf: mmap.mmap, pos: int, hints: dict[int, ChunkId]) -> ChunkId | None:
    """The chunk a damaged range at ``pos`` held: the trailer's word, else its header's."""
    if pos in hints:
        return hints[pos]
    if pos + fmt.RECORD_HEADER.size <= len(buf):
        header = fmt.RECORD_HEADER.unpack(buf[pos : pos + fmt.RECORD_HEADER.size])
        if header[0] == fmt.RECORD_MAGIC:
            return ChunkId(header[-1])
    return None


def _trailer_hints(buf: mmap.mmap, size: int) -> tuple[dict[int, ChunkId], int | None]:
    """From a trailer whose CRC fails but whose footer still reads and fits the file: where
    the records end, and offset → chunk id (hints for naming lost records, nothing more)."""
    if size < fmt.PACK_HEADER.size + fmt.PACK_FOOTER.size:
        return {}, None
    magic, _, count, _, offset = fmt.PACK_FOOTER.unpack(buf[size - fmt.PACK_FOOTER.size :])
    end = offset + count * fmt.TRAILER_ENTRY.size
    if (
        magic != fmt.PACK_FOOTER_MAGIC
        or offset < fmt.PACK_HEADER.size
        or end + fmt.PACK_FOOTER.size != size
    ):
        return {}, None
    hints = {off: ChunkId(cid) for cid, off, _, _ in fmt.TRAILER_ENTRY.iter_unpack(buf[offset:end])}
    return hints, offset
