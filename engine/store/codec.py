"""Encode a chunk into a record and back (layout in ``format``).

encode: id = keyed BLAKE3(plaintext) → zstd (kept only if smaller) → AES-256-GCM with
id ‖ version ‖ flags as associated data → CRC32 → *verify* (a sample of the records, below):
the record is decoded again and its keyed hash compared with the id before anyone may append
it to a pack.

decode: CRC32 → header checks → AES-GCM open → zstd → length check → keyed BLAKE3 must
equal the record's id (and the id the caller expected). Any failure raises ``CorruptRecord``
naming the chunk, pack and offset; a wrong plaintext is never returned.

A ``Codec`` is safe to share between threads (zstd contexts are per thread). It is what the
``CpuPool`` implementations run, in threads or in worker processes.

Verify after encode
-------------------
What it is for: a compressor or cipher that writes a record which does not decode to its
chunk — a library bug (restic's zstd-level bug, restic#4677, is why restic verifies every
blob since 0.17), a bad build, memory corruption in the encoder's buffers. What it costs,
measured by ``make bench`` on the 2-core reference machine: decoding (AES open + zstd
decompress + keyed BLAKE3) is ~1.3 ns per plaintext byte against ~3.5 ns to encode, so
verifying every record adds ~37 % CPU; a full backup ran at 216–281 MB/s verifying all,
316–325 MB/s verifying one in 8, 323–335 MB/s verifying none (same image, back to back).

The decision: one record in ``VERIFY_EVERY`` (8), drawn at random, is verified (~5 % CPU).
A systematic fault — a broken library or build, a bug in how buffers are handed around —
hits many records and fails the first backup within a few dozen chunks, before the snapshot
commits; that is the failure that silently spoils every later backup through dedup. A fault
in one record only (a cosmic-ray flip) is as likely to hit the plaintext before it is hashed,
which no verify-after-encode can see; the store's ``verify`` job (every record decoded, a bad
one marked so the next backup stores it again) is the guarantee for those, and for what the
disk does later. ``verify_every=1`` restores full verification for a caller that wants it.
"""

import os
import random
import threading
from dataclasses import dataclass

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.core.errors import CorruptRecord, KeyFileError
from engine.core.ids import ChunkId, short
from engine.store import format as fmt
from engine.store.keys import StoreKeys
from engine.store.layout import DEFAULT_ZSTD_LEVEL

# Verify-after-encode decodes one record in VERIFY_EVERY again before it may be stored (see
# "Verify after encode" above for the measurements behind the rate); 1 = every record.
VERIFY_EVERY: int = 8

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class RecordHeader:
    flags: int
    plain_len: int
    payload_len: int
    chunk_id: ChunkId

    @property
    def size(self) -> int:
        return fmt.RECORD_HEADER.size + self.payload_len + fmt.RECORD_CRC.size


def parse_header(record: Buffer, pack: str = "?", offset: int = 0) -> RecordHeader:
    """Parse and sanity-check a record header; raises CorruptRecord."""
    if len(record) < fmt.RECORD_HEADER.size + fmt.RECORD_CRC.size:
        raise CorruptRecord(chunk="?", pack=pack, offset=offset, reason="shorter than a header")
    magic, version, flags, reserved, plain_len, payload_len, cid = fmt.RECORD_HEADER.unpack_from(
        record
    )
    chunk = short(cid)
    if magic != fmt.RECORD_MAGIC:
        raise CorruptRecord(chunk=chunk, pack=pack, offset=offset, reason="bad record magic")
    if version != fmt.FORMAT_VERSION:
        raise CorruptRecord(
            chunk=chunk, pack=pack, offset=offset, reason=f"unknown format version {version}"
        )
    if flags & ~fmt.KNOWN_FLAGS or reserved:
        raise CorruptRecord(
            chunk=chunk,
            pack=pack,
            offset=offset,
            reason=f"unknown flags {flags} or reserved bits set",
        )
    if plain_len > fmt.MAX_CHUNK_SIZE:
        raise CorruptRecord(chunk=chunk, pack=pack, offset=offset, reason="plaintext too long")
    return RecordHeader(flags, plain_len, payload_len, ChunkId(cid))


def check_crc(record: Buffer, pack: str = "?", offset: int = 0) -> RecordHeader:
    """Check a record's framing and CRC32 without any key (what a keyless peer can do)."""
    header = parse_header(record, pack, offset)
    if len(record) != header.size:
        raise CorruptRecord(
            chunk=short(header.chunk_id),
            pack=pack,
            offset=offset,
            reason=f"length {len(record)} does not match header ({header.size})",
        )
    body_end = header.size - fmt.RECORD_CRC.size
    (crc,) = fmt.RECORD_CRC.unpack_from(record, body_end)
    if fmt.crc32(memoryview(record)[:body_end]) != crc:
        raise CorruptRecord(
            chunk=short(header.chunk_id), pack=pack, offset=offset, reason="CRC32 mismatch"
        )
    return header


class Codec:
    """Record encoder/decoder for one store's keys."""

    def __init__(
        self, keys: StoreKeys, level: int = DEFAULT_ZSTD_LEVEL, verify_every: int | None = None
    ):
        self._id_key = keys.id_key
        self._aead = AESGCM(keys.data_key) if keys.data_key else None
        self._level = level
        every = VERIFY_EVERY if verify_every is None else verify_every
        if every < 0:
            raise ValueError(f"verify_every is 0 (never), 1 (every record) or N, not {every}")
        self._verify_share = 1 / every if every else 0.0
        self._local = threading.local()

    # zstd contexts are not thread-safe; one pair per thread.
    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self._level)
        return cctx

    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def chunk_id(self, plain: Buffer) -> ChunkId:
        return ChunkId(blake3.blake3(plain, key=self._id_key).digest())

    def encode(self, plain: Buffer, chunk_id: ChunkId) -> bytearray:
        """Encode ``plain`` (whose id the caller computed) into a new, verified record."""
        out = bytearray(fmt.max_record_size(len(plain)))
        n = self.encode_into(plain, chunk_id, memoryview(out))
        del out[n:]
        return out

    def encode_into(self, plain: Buffer, chunk_id: ChunkId, out: memoryview) -> int:
        """Encode into ``out`` (at least ``max_record_size(len(plain))`` bytes); returns the
        record length. The record is verified before this returns."""
        if len(plain) > fmt.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk of {len(plain)} bytes exceeds {fmt.MAX_CHUNK_SIZE}")
        compressed = self._cctx().compress(plain)
        flags = 0
        body: Buffer = plain
        if len(compressed) < len(plain):
            body, flags = compressed, fmt.FLAG_COMPRESSED
        hdr = fmt.RECORD_HEADER.size
        if self._aead is not None:
            flags |= fmt.FLAG_ENCRYPTED
            payload_len = fmt.NONCE_SIZE + len(body) + fmt.TAG_SIZE
            nonce = os.urandom(fmt.NONCE_SIZE)
            out[hdr : hdr + fmt.NONCE_SIZE] = nonce
            start = hdr + fmt.NONCE_SIZE
            self._aead.encrypt_into(
                nonce, body, fmt.record_aad(chunk_id, flags), out[start : hdr + payload_len]
            )
        else:
            payload_len = len(body)
            out[hdr : hdr + payload_len] = body
        fmt.RECORD_HEADER.pack_into(
            out,
            0,
            fmt.RECORD_MAGIC,
            fmt.FORMAT_VERSION,
            flags,
            0,
            len(plain),
            payload_len,
            chunk_id,
        )
        end = hdr + payload_len
        fmt.RECORD_CRC.pack_into(out, end, fmt.crc32(out[:end]))
        size = end + fmt.RECORD_CRC.size
        if self._sampled():
            self._verify_record(out[:size], plain, chunk_id, flags, payload_len)
        return size

    def _sampled(self) -> bool:
        share = self._verify_share
        return share == 1 or (share > 0 and random.random() < share)  # noqa: S311 - not a secret

    def _scratch(self, name: str, size: int) -> memoryview:
        """A per-thread buffer reused across calls: fresh MiB-sized allocations page-fault
        on every call (measured: zstd decompression runs ~1.7x faster into a reused buffer)."""
        buf: bytearray | None = getattr(self._local, name, None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, fmt.MIN_CHUNK_SIZE))
            setattr(self._local, name, buf)
        return memoryview(buf)[:size]

    def _verify_record(
        self, record: memoryview, plain: Buffer, chunk_id: ChunkId, flags: int, payload_len: int
    ) -> None:
        # Decode what we just wrote and re-hash it: the keyed hash must give back the id, which
        # was computed from the plaintext in hand. (Re-hashing runs without the GIL at GB/s;
        # comparing memoryviews in Python holds the GIL ~1-4 ms per MiB and serialised the
        # thread pool.) The CRC was computed over this buffer a moment ago: not re-checked.
        out = self._scratch("verify_out", len(plain) + fmt.TAG_SIZE)
        n = self._decode_payload(record, chunk_id, flags, payload_len, len(plain), out, "(new)", 0)
        if n != len(plain) or self.chunk_id(out[:n]) != chunk_id:
            raise CorruptRecord(
                chunk=short(chunk_id), pack="(new)", offset=0, reason="verify-after-encode failed"
            )

    def _decode_payload(
        self,
        record: Buffer,
        chunk_id: ChunkId,
        flags: int,
        payload_len: int,
        plain_len: int,
        out: memoryview,
        pack: str,
        offset: int,
    ) -> int:
        """Decrypt and decompress a record's payload into ``out``; returns the length."""
        hdr = fmt.RECORD_HEADER.size
        payload = memoryview(record)[hdr : hdr + payload_len]
        if flags & fmt.FLAG_ENCRYPTED:
            if self._aead is None:
                raise KeyFileError(
                    path="(store keys)", reason=f"chunk {short(chunk_id)} is encrypted; no data key"
                )
            body_len = payload_len - fmt.NONCE_SIZE - fmt.TAG_SIZE
            if body_len < 0:
                raise CorruptRecord(
                    chunk=short(chunk_id), pack=pack, offset=offset, reason="payload too short"
                )
            # Decrypt into the caller's buffer when the body is the plaintext, else into
            # scratch space that zstd then reads.
            target = out if not flags & fmt.FLAG_COMPRESSED else self._scratch("body", body_len)
            if body_len > len(target):
                raise CorruptRecord(
                    chunk=short(chunk_id), pack=pack, offset=offset, reason="payload too long"
                )
            try:
                self._aead.decrypt_into(
                    payload[: fmt.NONCE_SIZE],
                    payload[fmt.NONCE_SIZE :],
                    fmt.record_aad(chunk_id, flags),
                    target[:body_len],
                )
            except InvalidTag as e:
                raise CorruptRecord(
                    chunk=short(chunk_id),
                    pack=pack,
                    offset=offset,
                    reason="AES-GCM authentication failed (wrong key or tampered data)",
                ) from e
            body: memoryview = target[:body_len]
            in_out = target is out  # already where the caller wants it
        else:
            body, in_out = payload, False
        if not flags & fmt.FLAG_COMPRESSED:
            if len(body) > len(out):
                raise CorruptRecord(
                    chunk=short(chunk_id), pack=pack, offset=offset, reason="payload too long"
                )
            if not in_out:
                out[: len(body)] = body
            return len(body)
        if plain_len > len(out):
            raise CorruptRecord(
                chunk=short(chunk_id), pack=pack, offset=offset, reason="plaintext too long"
            )
        try:
            reader = self._dctx().stream_reader(body)
            n = 0
            while n < plain_len and (got := reader.readinto(out[n:plain_len])):
                n += got
            if reader.read(1):
                raise CorruptRecord(
                    chunk=short(chunk_id), pack=pack, offset=offset, reason="plaintext too long"
                )
        except zstandard.ZstdError as e:
            raise CorruptRecord(
                chunk=short(chunk_id), pack=pack, offset=offset, reason=f"zstd: {e}"
            ) from e
        return n

    def decode(
        self,
        record: Buffer,
        expected_id: ChunkId | None = None,
        pack: str = "?",
        offset: int = 0,
    ) -> bytes:
        """Decode a record fully checked; raises CorruptRecord naming chunk, pack, offset."""
        header = parse_header(record, pack, offset)
        out = bytearray(header.plain_len)
        n = self.decode_into(record, memoryview(out), expected_id, pack, offset)
        return bytes(out[:n]) if n != len(out) else bytes(out)

    def decode_into(
        self,
        record: Buffer,
        out: memoryview,
        expected_id: ChunkId | None = None,
        pack: str = "?",
        offset: int = 0,
    ) -> int:
        """Decode a record into ``out`` (at least its plaintext length), fully checked:
        CRC, AEAD, length and keyed hash. Returns the plaintext length. Raises
        CorruptRecord naming chunk, pack and offset; ``out`` holds garbage after an error."""
        header = check_crc(record, pack, offset)
        cid = header.chunk_id
        if expected_id is not None and cid != expected_id:
            raise CorruptRecord(
                chunk=short(expected_id),
                pack=pack,
                offset=offset,
                reason=f"record holds chunk {short(cid)} instead",
            )
        if header.plain_len > len(out):
            raise ValueError(
                f"chunk {short(cid)} in pack {pack} at offset {offset} holds {header.plain_len} "
                f"bytes; the buffer holds {len(out)}"
            )
        n = self._decode_payload(
            record, cid, header.flags, header.payload_len, header.plain_len, out, pack, offset
        )
        if n != header.plain_len:
            raise CorruptRecord(
                chunk=short(cid), pack=pack, offset=offset, reason="plaintext length mismatch"
            )
        if self.chunk_id(out[:n]) != cid:
            raise CorruptRecord(
                chunk=short(cid), pack=pack, offset=offset, reason="content does not match its id"
            )
        return n
