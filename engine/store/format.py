"""The byte layouts of the store: the only module that knows magic numbers and structs.

All integers are big-endian. Every layout starts with a 4-byte magic and a format version
so a stray file is recognised, and carries a CRC or checksum so damage is detected. Stores
in these layouts exist: ``tests/golden/store-v1`` is one, committed as bytes, and every
later version of this module must still open, verify and restore it.

Record (one encoded chunk; ``RECORD_HEADER`` + payload + CRC)::

    0   4  magic  b"TSRC"
    4   1  format version
    5   1  flags  (FLAG_COMPRESSED, FLAG_ENCRYPTED)
    6   2  reserved, 0
    8   4  plaintext length
    12  4  payload length N
    16  32 chunk id (keyed BLAKE3-256 of the plaintext)
    48  N  payload: [nonce(12) ‖ AES-256-GCM(body) ‖ tag(16)] if encrypted, else body;
           body = zstd(plaintext) if compressed, else plaintext
    48+N 4 CRC32 of bytes [0, 48+N) — checkable by a site that holds no key

    AES-GCM associated data = chunk id ‖ version ‖ flags, so a store cannot swap records.

Pack (an append-only file of records; sealed packs never change; the trailer is an index of
the records for speed — the records alone are enough to rebuild it, see ``scan``)::

    PACK_HEADER   magic b"TSPK", version, 3 reserved, pack id (16 bytes)     = 24 bytes
    records…      back to back
    trailer       one TRAILER_ENTRY per record: chunk id(32), offset u64, length u32,
                  plaintext length u32                                      = 48 bytes each
    PACK_FOOTER   magic b"TSPT", version, 3 reserved, count u32,
                  CRC32 of the trailer entries u32, trailer offset u64      = 24 bytes

DiskMap (one per disk per snapshot; PBS's fixed index)::

    DISKMAP_HEADER  magic b"TSDM", version, 3 reserved, chunk size u32, disk size u64,
                    slot count u64, checksum (32): BLAKE3-256 of the three
                    sizes and the id array                                   = 64 bytes
    ids             slot count × 32 bytes, slot i at 64 + 32·i; ZERO id = all-zero slot

Manifest: ``MANIFEST_MAGIC`` ‖ 64 hex digits of the keyed MAC ‖ b"\\n" ‖ JSON body.
"""

import struct
from collections.abc import Callable
from typing import Final

from zlib_ng import zlib_ng

# CRC32 here is CRC-32/ISO-HDLC, zlib's ``crc32``. zlib-ng computes the same values with
# carry-less multiplication: 65 GB/s against zlib's 4.9 on the reference machine, where
# zlib's crc32 was 6 % of a restore's CPU.
crc32: Final[Callable[[bytes | bytearray | memoryview], int]] = zlib_ng.crc32

FORMAT_VERSION: Final = 1

# --- records -----------------------------------------------------------------------------
RECORD_MAGIC: Final = b"TSRC"
RECORD_HEADER: Final = struct.Struct(">4sBBHII32s")
RECORD_CRC: Final = struct.Struct(">I")  # of ``crc32`` above
FLAG_COMPRESSED: Final = 0x01
FLAG_ENCRYPTED: Final = 0x02
KNOWN_FLAGS: Final = FLAG_COMPRESSED | FLAG_ENCRYPTED
NONCE_SIZE: Final = 12  # 96-bit random nonces, the size AES-GCM is specified for
TAG_SIZE: Final = 16
# Plaintext and payload lengths are u32; chunk sizes are capped far below that.
MAX_CHUNK_SIZE: Final = 8 * 1024 * 1024
MIN_CHUNK_SIZE: Final = 64 * 1024


def max_record_size(chunk_size: int) -> int:
    """Largest record a chunk of ``chunk_size`` can produce (stored uncompressed, encrypted)."""
    return RECORD_HEADER.size + NONCE_SIZE + chunk_size + TAG_SIZE + RECORD_CRC.size


def record_aad(chunk_id: bytes, flags: int) -> bytes:
    return chunk_id + bytes((FORMAT_VERSION, flags))


# --- packs -------------------------------------------------------------------------------
PACK_MAGIC: Final = b"TSPK"
PACK_HEADER: Final = struct.Struct(">4sB3x16s")
TRAILER_ENTRY: Final = struct.Struct(">32sQII")
PACK_FOOTER_MAGIC: Final = b"TSPT"
PACK_FOOTER: Final = struct.Struct(">4sB3xIIQ")
PACK_ID_SIZE: Final = 16

# --- DiskMaps ----------------------------------------------------------------------------
DISKMAP_MAGIC: Final = b"TSDM"
DISKMAP_HEADER: Final = struct.Struct(">4sB3xIQQ32s")
DISKMAP_HEADER_SIZE: Final = 64  # header padded to 64 so slot i sits at 64 + 32·i
DISKMAP_ENTRY_SIZE: Final = 32
# The checksum is BLAKE3(chunk size u32 ‖ disk size u64 ‖ slot count u64 ‖ ids).
DISKMAP_CHECKSUM_PREFIX: Final = struct.Struct(">IQQ")

# --- manifests ---------------------------------------------------------------------------
MANIFEST_MAGIC: Final = b"TSMF1 "
MANIFEST_MAC_HEX: Final = 64

assert RECORD_HEADER.size == 48
assert PACK_HEADER.size == 24
assert TRAILER_ENTRY.size == 48
assert PACK_FOOTER.size == 24
assert DISKMAP_HEADER.size <= DISKMAP_HEADER_SIZE
