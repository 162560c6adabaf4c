"""Records: encode/decode round trips, header rules, and every way a bad record is refused."""

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import CorruptRecord, KeyFileError
from engine.core.ids import short
from engine.store import format as fmt
from engine.store.codec import Codec, check_crc, parse_header
from engine.store.keys import StoreKeys

ENC = StoreKeys.generate(encrypted=True)
PLAIN = StoreKeys.generate(encrypted=False)


def encode(codec: Codec, data: bytes) -> tuple[bytes, bytes]:
    cid = codec.chunk_id(data)
    return cid, bytes(codec.encode(data, cid))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=70_000), encrypted=st.booleans())
def test_round_trip(data: bytes, encrypted: bool) -> None:
    codec = Codec(ENC if encrypted else PLAIN)
    cid, record = encode(codec, data)
    header = check_crc(record)
    assert header.chunk_id == cid
    assert header.plain_len == len(data)
    assert bool(header.flags & fmt.FLAG_ENCRYPTED) == encrypted
    assert codec.decode(record, cid) == data


def test_compressed_only_when_smaller() -> None:
    codec = Codec(ENC)
    _, text = encode(codec, b"hello world " * 5000)
    _, noise = encode(codec, os.urandom(60_000))
    assert parse_header(text).flags & fmt.FLAG_COMPRESSED
    assert not parse_header(noise).flags & fmt.FLAG_COMPRESSED
    assert len(text) < 5000


def test_ids_are_keyed() -> None:
    data = b"same plaintext" * 100
    assert Codec(ENC).chunk_id(data) != Codec(StoreKeys.generate(True)).chunk_id(data)


def test_encrypted_payload_does_not_contain_plaintext() -> None:
    data = os.urandom(32) * 2000  # incompressible-ish but repetitive on 32-byte scale
    _, record = encode(Codec(ENC), data)
    assert data[:32] not in record


@pytest.mark.parametrize("keys", [ENC, PLAIN], ids=["encrypted", "plain"])
def test_every_flipped_byte_is_detected(keys: StoreKeys) -> None:
    codec = Codec(keys)
    data = b"a small chunk with some text " * 50
    cid, record = encode(codec, data)
    for pos in range(0, len(record), max(1, len(record) // 97)):
        bad = bytearray(record)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptRecord) as e:
            codec.decode(bytes(bad), cid, pack="p1", offset=777)
        assert "pack p1 at offset 777" in str(e.value)


@pytest.mark.parametrize("keys", [ENC, PLAIN], ids=["encrypted", "plain"])
def test_tampering_with_fixed_crc_is_still_detected(keys: StoreKeys) -> None:
    """An attacker can recompute the CRC; AEAD (or the id hash) must still refuse."""
    codec = Codec(keys)
    data = b"the quick brown fox " * 100
    cid, record = encode(codec, data)
    bad = bytearray(record)
    bad[fmt.RECORD_HEADER.size + 20] ^= 1
    end = len(bad) - fmt.RECORD_CRC.size
    fmt.RECORD_CRC.pack_into(bad, end, zlib.crc32(bad[:end]))
    with pytest.raises(CorruptRecord, match=short(cid)):
        codec.decode(bytes(bad), cid)


def test_wrong_key_never_yields_plaintext() -> None:
    cid, record = encode(Codec(ENC), b"secret data " * 100)
    with pytest.raises(CorruptRecord, match="AES-GCM authentication failed"):
        Codec(StoreKeys.generate(True)).decode(record, cid)


def test_encrypted_record_without_data_key() -> None:
    cid, record = encode(Codec(ENC), b"x" * 1000)
    with pytest.raises(KeyFileError, match="no data key"):
        Codec(PLAIN).decode(record, cid)


def test_swapped_record_is_refused() -> None:
    codec = Codec(ENC)
    cid_a, _ = encode(codec, b"a" * 1000)
    _, record_b = encode(codec, b"b" * 1000)
    with pytest.raises(CorruptRecord, match="record holds chunk"):
        codec.decode(record_b, cid_a)


def test_header_swap_of_id_is_refused() -> None:
    """Rewriting the id in the header (and CRC) breaks the AEAD associated data."""
    codec = Codec(ENC)
    _, record = encode(codec, b"a" * 1000)
    other = codec.chunk_id(b"b" * 1000)
    bad = bytearray(record)
    bad[16:48] = other
    end = len(bad) - 4
    fmt.RECORD_CRC.pack_into(bad, end, zlib.crc32(bad[:end]))
    with pytest.raises(CorruptRecord, match="AES-GCM"):
        codec.decode(bytes(bad), other)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda r: b"XXXX" + r[4:], "bad record magic"),
        (lambda r: r[:4] + b"\x09" + r[5:], "unknown format version"),
        (lambda r: r[:5] + b"\x80" + r[6:], "unknown flags"),
        (lambda r: r[:20], "shorter than a header"),
        (lambda r: r[:-1], "does not match header"),
        (lambda r: r + b"\0", "does not match header"),
    ],
)
def test_header_errors(mutate: object, reason: str) -> None:
    codec = Codec(ENC)
    cid, record = encode(codec, b"z" * 500)
    with pytest.raises(CorruptRecord, match=reason):
        codec.decode(mutate(record), cid)  # type: ignore[operator]


def test_verify_after_encode_catches_a_broken_compressor(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(ENC, verify_every=1)
    data = b"compressible " * 1000
    cid = codec.chunk_id(data)

    class Liar:
        def compress(self, plain: bytes) -> bytes:
            import zstandard

            return zstandard.ZstdCompressor().compress(bytes(plain[:-1]) + b"!")

    monkeypatch.setattr(codec, "_cctx", lambda: Liar())
    with pytest.raises(CorruptRecord, match="verify-after-encode failed"):
        codec.encode(data, cid)


def test_sampled_verify_catches_a_systematic_fault_within_a_few_dozen_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default samples one record in ``VERIFY_EVERY``: a compressor that spoils every
    record is caught long before a backup of any size is done (the chance of missing it in
    200 records is (7/8)^200, about 1e-12), and never caught when verification is off."""
    import zstandard

    class Liar:
        def compress(self, plain: bytes) -> bytes:
            return zstandard.ZstdCompressor().compress(bytes(plain[:-1]) + b"!")

    sampled, never = Codec(ENC), Codec(ENC, verify_every=0)
    monkeypatch.setattr(sampled, "_cctx", lambda: Liar())
    monkeypatch.setattr(never, "_cctx", lambda: Liar())
    caught = None
    for i in range(200):
        data = b"compressible %d " % i * 500
        never.encode(data, never.chunk_id(data))  # stored spoiled: nothing checks
        try:
            sampled.encode(data, sampled.chunk_id(data))
        except CorruptRecord as e:
            caught = (i, str(e))
            break
    assert caught is not None and "verify-after-encode failed" in caught[1]
    with pytest.raises(ValueError, match="verify_every"):
        Codec(ENC, verify_every=-1)


def test_oversized_chunk_rejected() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        Codec(PLAIN).encode(bytes(fmt.MAX_CHUNK_SIZE + 1), Codec(PLAIN).chunk_id(b""))


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 65_537, 1 << 20])
def test_the_format_crc_is_zlibs(size: int) -> None:
    """Records and trailers on disk carry zlib's CRC-32 (golden stores were written with it);
    the faster implementation must give the same value for every kind of buffer."""
    data = os.urandom(size + 3)
    for buf in (data, bytearray(data), memoryview(data)[3:], memoryview(bytearray(data))[1:-2]):
        assert fmt.crc32(buf) == zlib.crc32(buf)
