"""Chunk ids.

A ChunkId is the 32-byte keyed BLAKE3 of a chunk's plaintext (key = the store's id-key).
It is carried as plain ``bytes`` so that a DiskMap of millions of slots is a flat byte
array, never a list of objects. ``ZERO_ID`` (32 zero bytes) is reserved: it marks an
all-zero slot, which is never hashed, never stored and never read.
"""

from typing import Final, NewType

ChunkId = NewType("ChunkId", bytes)

CHUNK_ID_SIZE: Final = 32
ZERO_ID: Final = ChunkId(bytes(CHUNK_ID_SIZE))


def chunk_id_from_hex(text: str) -> ChunkId:
    """Parse a 64-hex-digit chunk id; raises ValueError naming the bad text."""
    raw = bytes.fromhex(text)
    if len(raw) != CHUNK_ID_SIZE:
        raise ValueError(f"chunk id {text!r}: expected {CHUNK_ID_SIZE} bytes, got {len(raw)}")
    return ChunkId(raw)


def short(chunk_id: bytes) -> str:
    """The first 16 hex digits, enough to name a chunk in messages."""
    return chunk_id.hex()[:16]
