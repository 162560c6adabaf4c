"""Scanning a pack's records (``engine.store.scan``) and open = recover with a damaged
trailer: every intact record is kept, a damaged one is skipped by resynchronising, and a
pack indexed by scanning warns once, not on every open; a killed re-seal is finished."""

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.maint.repair import repair
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.store.pack import pack_path, read_trailer
from engine.store.scan import scan_pack
from engine.util import failpoints
from tests.conftest import PASSPHRASE, StoreFactory
from tests.helpers import read_disk, write_snapshot

CHUNK = 64 * 1024


def one_pack(make_store: StoreFactory) -> tuple[Store, Manifest, bytes, Path]:
    store = make_store(chunk_size=CHUNK)
    disk = os.urandom(10 * CHUNK)
    m = write_snapshot(store, "vm", {"d": disk})
    (path,) = store.layout.pack_files().values()
    return store, m, disk, path


def reopen(store: Store) -> Store:
    return Store.open(store.path, passphrase=PASSPHRASE)


@pytest.fixture
def no_failpoints() -> Iterator[None]:
    yield
    failpoints.install(None)


def test_scan_of_a_whole_pack_matches_its_trailer(make_store: StoreFactory) -> None:
    store, _, _, path = one_pack(make_store)
    scan = scan_pack(path, path.stem, store.codec.decode)
    assert scan.trailer is None and scan.lost == [] and scan.header is None
    assert scan.entries == read_trailer(path, path.stem)[1]


def test_scan_resynchronises_after_a_damaged_record(make_store: StoreFactory) -> None:
    _, _, _, path = one_pack(make_store)
    entries = read_trailer(path, path.stem)[1]
    raw = bytearray(path.read_bytes())
    raw[entries[3].offset] ^= 0xFF  # the magic of record 3: its framing is gone
    raw[-30] ^= 0x01  # and the trailer
    path.write_bytes(raw)
    scan = scan_pack(path, path.stem)
    assert scan.trailer is not None
    assert [e.offset for e in scan.entries] == [e.offset for i, e in enumerate(entries) if i != 3]
    assert [(x.offset, x.length, x.chunk) for x in scan.lost] == [
        (entries[3].offset, entries[3].length, entries[3].chunk_id)
    ]


def test_decode_failure_skips_exactly_that_record(make_store: StoreFactory) -> None:
    store, _, _, path = one_pack(make_store)
    entries = read_trailer(path, path.stem)[1]
    raw = bytearray(path.read_bytes())
    e = entries[5]  # a payload byte flipped and the CRC recomputed: only AEAD can tell
    raw[e.offset + 100] ^= 0x01
    end = e.offset + e.length - fmt.RECORD_CRC.size
    raw[end : end + 4] = fmt.RECORD_CRC.pack(zlib.crc32(raw[e.offset : end]))
    path.write_bytes(raw)
    assert len(scan_pack(path, path.stem).entries) == len(entries)  # CRC only: fooled
    scan = scan_pack(path, path.stem, store.codec.decode)
    assert [x.offset for x in scan.lost] == [e.offset] and len(scan.entries) == len(entries) - 1


def test_open_indexes_an_unindexed_pack_with_a_bad_trailer_once(
    make_store: StoreFactory,
) -> None:
    store, m, disk, path = one_pack(make_store)
    store.index.drop_pack(path.stem)
    store.close()
    raw = bytearray(path.read_bytes())
    raw[-fmt.PACK_FOOTER.size - 7] ^= 0x01
    path.write_bytes(raw)
    again = reopen(store)
    assert [s.name for s in again.report.scanned] == [path.stem]
    assert any("damaged trailer" in p for p in again.report.problems)
    assert read_disk(again, m) == disk
    again.close()
    with reopen(store) as third:
        assert third.report.problems == []  # indexed now: no warning on every open
        result = repair(third)
        assert not result.lost and [r.pack for r in result.resealed] == [path.stem]


def test_killed_reseal_is_finished_by_the_next_open(
    make_store: StoreFactory, no_failpoints: None
) -> None:
    store, m, disk, path = one_pack(make_store)
    raw = bytearray(path.read_bytes())
    raw[-fmt.PACK_FOOTER.size - 7] ^= 0x01
    path.write_bytes(raw)

    def stop(name: str) -> None:
        if name == "repair.reseal.committed":
            raise RuntimeError("killed")

    failpoints.install(stop)
    with pytest.raises(RuntimeError):
        repair(store)
    failpoints.install(None)
    store.close()
    with reopen(store) as again:
        assert again.report.quarantine_finished == [path.stem]
        assert not path.exists() and (again.layout.quarantine / path.name).exists()
        assert read_disk(again, m) == disk
        assert pack_path(again.layout.packs, path.stem) == path
        assert repair(again).verify.ok
