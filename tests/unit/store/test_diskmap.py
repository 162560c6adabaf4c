"""DiskMaps: encode/decode round trips, the streaming writer, and damaged files."""

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import CorruptDiskMap
from engine.core.ids import ZERO_ID
from engine.store import diskmap
from engine.store import format as fmt

CHUNK = 64 * 1024


@st.composite
def maps(draw: st.DrawFn) -> tuple[int, int, bytes]:
    chunk_size = 1 << draw(st.integers(16, 23))
    disk_size = draw(st.integers(0, 40 * chunk_size))
    slots = diskmap.slot_count(disk_size, chunk_size)
    ids = b"".join(
        draw(st.sampled_from([ZERO_ID, b"\x01" * 32, b"\xab" * 32])) for _ in range(slots)
    )
    return chunk_size, disk_size, ids


@settings(max_examples=80, deadline=None)
@given(m=maps())
def test_encode_decode_round_trip(m: tuple[int, int, bytes]) -> None:
    chunk_size, disk_size, ids = m
    raw = diskmap.encode(chunk_size, disk_size, ids)
    assert len(raw) == fmt.DISKMAP_HEADER_SIZE + len(ids)
    assert diskmap.decode(raw) == (chunk_size, disk_size, ids)


@settings(max_examples=40, deadline=None)
@given(m=maps(), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(m: tuple[int, int, bytes], pos: int, bit: int) -> None:
    raw = bytearray(diskmap.encode(*m))
    raw[pos % len(raw)] ^= 1 << bit
    with pytest.raises(CorruptDiskMap):
        diskmap.decode(bytes(raw))


def test_slot_count() -> None:
    assert diskmap.slot_count(0, CHUNK) == 0
    assert diskmap.slot_count(1, CHUNK) == 1
    assert diskmap.slot_count(CHUNK, CHUNK) == 1
    assert diskmap.slot_count(CHUNK + 1, CHUNK) == 2


def test_writer_out_of_order_and_reader(tmp_path: Path) -> None:
    size = 10 * CHUNK + 123
    ids = [os.urandom(32) for _ in range(11)]
    ids[3] = ZERO_ID
    w = diskmap.DiskMapWriter(tmp_path / "d.dmap", size, CHUNK)
    for slot in [5, 0, 10, 7, 1, 2, 4, 6, 8, 9]:
        w.set(slot, ids[slot])
    w.set_zero(3, 1)
    checksum = w.finish()
    assert w.data_bytes == 9 * CHUNK + 123
    assert not (tmp_path / "d.dmap.tmp").exists()
    with diskmap.DiskMap(tmp_path / "d.dmap", checksum) as dm:
        assert dm.slots == 11 and dm.disk_size == size and dm.chunk_size == CHUNK
        assert [cid for _, cid in dm.iter_ids()] == ids
        assert dm.get(10) == ids[10]
        with pytest.raises(IndexError):
            dm.get(11)
    raw = (tmp_path / "d.dmap").read_bytes()
    assert diskmap.decode(raw) == (CHUNK, size, b"".join(ids))


def test_writer_refuses_unset_slots(tmp_path: Path) -> None:
    w = diskmap.DiskMapWriter(tmp_path / "d.dmap", 3 * CHUNK, CHUNK)
    w.set(0, os.urandom(32))
    with pytest.raises(ValueError, match="2 slots were never set"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_double_set(tmp_path: Path) -> None:
    w = diskmap.DiskMapWriter(tmp_path / "d.dmap", 3 * CHUNK, CHUNK)
    w.set(1, os.urandom(32))
    with pytest.raises(ValueError, match="set twice"):
        w.set(1, os.urandom(32))
    with pytest.raises(ValueError, match="overlaps"):
        w.set_zero(0, 2)
    with pytest.raises(ValueError, match="bad slot"):
        w.set(3, os.urandom(32))
    w.abort()


def test_big_sparse_map_streams(tmp_path: Path) -> None:
    """A 16 TiB disk at 1 MiB chunks: 16 Mi slots, set as one zero range."""
    size = 16 * 1024**4
    w = diskmap.DiskMapWriter(tmp_path / "big.dmap", size, 1024 * 1024)
    w.set_zero(0, w.slots - 1)
    w.set(w.slots - 1, b"\x07" * 32)
    checksum = w.finish()
    with diskmap.DiskMap(tmp_path / "big.dmap", checksum) as dm:
        assert dm.get(dm.slots - 1) == b"\x07" * 32
        assert dm.get(0) == ZERO_ID


def test_reader_detects_damage(tmp_path: Path) -> None:
    path = tmp_path / "d.dmap"
    path.write_bytes(diskmap.encode(CHUNK, 4 * CHUNK, os.urandom(128)))
    good = path.read_bytes()
    checksum = good[fmt.DISKMAP_HEADER.size - 32 : fmt.DISKMAP_HEADER.size]
    with pytest.raises(CorruptDiskMap, match="differs from its manifest"):
        diskmap.DiskMap(path, b"\0" * 32)
    path.write_bytes(good[:-5])
    with pytest.raises(CorruptDiskMap, match="not as declared"):
        diskmap.DiskMap(path, checksum)
    bad = bytearray(good)
    bad[-1] ^= 1
    path.write_bytes(bad)
    with pytest.raises(CorruptDiskMap, match=f"{path}: id array checksum mismatch"):
        diskmap.DiskMap(path, checksum)
