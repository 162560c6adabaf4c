"""The ``PackObjects`` contract (``engine.store.objects``): where sealed packs live.

Every implementation runs these tests through the ``packs`` fixture: ``LocalPacks`` (a
directory) and ``S3Packs`` (a bucket of a real Ceph RGW, ``tests.s3.rgw``, under a prefix),
also in a bucket with object lock (versioned: RGW 16 ignores ``If-None-Match`` there, so
create-only rests on the versions' order).
What users rely on, from the module's docstring:

- A sealed pack put reads back by byte ranges exactly (header, records, trailer, footer),
  also a pack of tens of MiB; ``stat`` gives its size and ``list`` names it.
- ``put`` is create-only: other content under an existing name is refused with
  ``PackExists`` and the first content stays; the same content again is success (a retry).
- A pack that is not there: ``read`` raises ``PackMissing`` naming the pack and where it was
  looked for; ``stat`` is None; ``delete`` of it is not an error.
- A range past the end returns what is there (nothing past the end); ``read_into`` fills the
  caller's buffer and says how much it read; ``read_tail`` gives the
  pack's size and its last bytes (all of it when shorter).
- ``read_trailer`` through it reads what ``pack.read_trailer`` reads from the file: in one
  request when the trailer fits ``TAIL_READ``, in two otherwise; a pack that is not one
  raises ``CorruptPack`` naming it.
- Counters count every request by kind and the payload bytes of puts and reads.
"""

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.core.errors import CorruptPack, PackExists, PackMissing
from engine.core.ids import ChunkId
from engine.io.s3 import S3Endpoint
from engine.store import format as fmt
from engine.store.objects import TAIL_READ, LocalPacks, PackObjects, S3Packs, read_trailer
from engine.store.pack import PackWriter, SealedPack, new_pack_name, pack_path
from engine.store.pack import read_trailer as read_file_trailer
from engine.store.retention import LockPolicy

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3", "s3-locked"])
def packs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PackObjects]:
    objects: PackObjects
    if request.param == "local":
        objects = LocalPacks(tmp_path / "store" / "packs")
    elif request.param == "s3":
        bucket: S3Endpoint = request.getfixturevalue("s3_bucket")
        objects = S3Packs.open(bucket, prefix="stores/a")
    else:  # object lock: versioned, create-only by versions, every pack locked for a day
        bucket = request.getfixturevalue("s3_buckets")(object_lock=True)
        objects = S3Packs.open(bucket, prefix="stores/a", lock=LockPolicy("GOVERNANCE", 86400))
    try:
        yield objects
    finally:
        objects.close()


def seal(directory: Path, records: list[bytes]) -> SealedPack:
    """A real sealed pack (PackWriter) of these records, in ``directory``."""
    writer = PackWriter(directory)
    for i, record in enumerate(records):
        writer.append(ChunkId(hashlib.blake2b(record, digest_size=32).digest()), record, i)
    return writer.seal()


def sealed_file(tmp_path: Path, records: list[bytes]) -> tuple[str, Path]:
    """(name, path) of a sealed pack made outside the packs under test."""
    src = tmp_path / "src"
    sealed = seal(src, records)
    return sealed.name, pack_path(src, sealed.name)


def other_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / "other" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_put_then_read_ranges_stat_list_delete(packs: PackObjects, tmp_path: Path) -> None:
    records = [os.urandom(1000), os.urandom(5000), b"x"]
    name, path = sealed_file(tmp_path, records)
    data = path.read_bytes()
    packs.put(name, path)
    stat = packs.stat(name)
    assert stat is not None
    assert stat.size == len(data)
    offset = fmt.PACK_HEADER.size
    for record in records:
        assert packs.read(name, offset, len(record)) == record
        offset += len(record)
    assert packs.read(name, 0, len(data)) == data
    footer = packs.read(name, len(data) - fmt.PACK_FOOTER.size, fmt.PACK_FOOTER.size)
    assert fmt.PACK_FOOTER.unpack(footer)[2] == len(records)
    assert [(s.name, s.size) for s in packs.list()] == [(name, len(data))]

    if locked(packs):  # a locked pack is never deleted: the bucket refuses, and we say so
        assert packs.delete([name]) == [name]
        assert packs.read(name, 0, len(data)) == data
        return
    assert packs.delete([name]) == []
    assert packs.stat(name) is None
    assert list(packs.list()) == []


def locked(packs: PackObjects) -> bool:
    return isinstance(packs, S3Packs) and packs.lock is not None


def test_list_names_every_pack(packs: PackObjects, tmp_path: Path) -> None:
    put = {}
    for i in range(5):
        name, path = sealed_file(tmp_path / str(i), [os.urandom(100 + i)])
        packs.put(name, path)
        put[name] = path.stat().st_size
    assert {s.name: s.size for s in packs.list()} == put
    refused = packs.delete(sorted(put)[:2])
    assert refused == (sorted(put)[:2] if locked(packs) else [])
    assert {s.name for s in packs.list()} == set(sorted(put)[0 if locked(packs) else 2 :])


def test_create_only_refuses_other_content_and_keeps_the_first(
    packs: PackObjects, tmp_path: Path
) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(2000)])
    first = path.read_bytes()
    packs.put(name, path)
    intruder = other_file(tmp_path, "intruder", first[:-1] + bytes([first[-1] ^ 1]))
    with pytest.raises(PackExists) as e:
        packs.put(name, intruder)
    assert name in str(e.value)
    assert packs.where in str(e.value)
    shorter = other_file(tmp_path, "shorter", b"short")
    with pytest.raises(PackExists):
        packs.put(name, shorter)
    assert packs.read(name, 0, len(first) + 10) == first


def test_concurrent_puts_of_one_name_store_exactly_one(packs: PackObjects, tmp_path: Path) -> None:
    name = new_pack_name()
    contents = [os.urandom(256 * 1024) for _ in range(4)]
    files = [other_file(tmp_path, f"c{i}", c) for i, c in enumerate(contents)]
    barrier = threading.Barrier(len(files))

    def put(path: Path) -> bool:
        barrier.wait()
        try:
            packs.put(name, path)
        except PackExists:
            return False
        return True

    with ThreadPoolExecutor(len(files)) as pool:
        won = list(pool.map(put, files))
    assert won.count(True) == 1
    assert packs.read(name, 0, 1 << 20) == contents[won.index(True)]


def test_put_of_the_same_content_again_is_a_retry_not_an_error(
    packs: PackObjects, tmp_path: Path
) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(3000)])
    packs.put(name, path)
    copy = other_file(tmp_path, "copy", path.read_bytes())
    packs.put(name, copy)
    assert packs.read(name, 0, 1 << 20) == path.read_bytes()
    assert [s.name for s in packs.list()] == [name]


def test_a_missing_pack_is_named(packs: PackObjects) -> None:
    name = new_pack_name()
    with pytest.raises(PackMissing) as e:
        packs.read(name, 0, 100)
    assert name in str(e.value)
    assert packs.where in str(e.value)
    assert packs.stat(name) is None
    with pytest.raises(PackMissing, match=name):
        packs.read_tail(name, 100)
    with pytest.raises(PackMissing, match=name):
        packs.read_into(name, 0, memoryview(bytearray(10)))
    with pytest.raises(PackMissing, match=name):
        read_trailer(packs, name)


def test_deleting_a_missing_pack_is_not_an_error(packs: PackObjects, tmp_path: Path) -> None:
    name, path = sealed_file(tmp_path, [b"kept"])
    packs.put(name, path)
    packs.delete([new_pack_name(), new_pack_name()])
    packs.delete([])
    assert [s.name for s in packs.list()] == [name]


def test_a_range_past_the_end_returns_what_is_there(packs: PackObjects, tmp_path: Path) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(500)])
    packs.put(name, path)
    data = path.read_bytes()
    assert packs.read(name, len(data) - 10, 100) == data[-10:]
    assert packs.read(name, len(data) + 5, 100) == b""
    assert packs.read(name, 3, 0) == b""
    out = bytearray(b"\xee" * 100)
    assert packs.read_into(name, len(data) - 10, memoryview(out)) == 10
    assert out[:10] == data[-10:]
    assert out[10:] == b"\xee" * 90  # nothing written past what was read
    assert packs.read_into(name, len(data) + 5, memoryview(out)) == 0


def test_pack_names_are_checked(packs: PackObjects, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a pack name"):
        packs.read("../../etc/passwd", 0, 10)
    with pytest.raises(ValueError, match="not a pack name"):
        packs.put("ABC", other_file(tmp_path, "x", b"x"))


def test_counters_count_requests_and_bytes(packs: PackObjects, tmp_path: Path) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(4000)])
    size = path.stat().st_size
    before = packs.counters.snapshot()
    packs.put(name, path)
    packs.read(name, 0, 100)
    packs.read(name, 100, 50)
    packs.read_into(name, 7, memoryview(bytearray(30)))
    packs.stat(name)
    assert len(list(packs.list())) == 1
    packs.delete([name])
    after = packs.counters.snapshot()
    delta = {
        k: (after[k].requests - before[k].requests, after[k].bytes - before[k].bytes) for k in after
    }
    # With object lock a put lists the versions and sets the lock (other: PutObjectRetention),
    # and a delete lists the versions first.
    lists, other = (3, 1) if locked(packs) else (1, 0)
    assert delta == {
        "put": (1, size),
        "get": (3, 180),
        "head": (1, 0),
        "list": (lists, 0),
        "delete": (1, 0),
        "other": (other, 0),
    }


def test_a_large_pack_round_trips_by_ranged_reads(packs: PackObjects, tmp_path: Path) -> None:
    # 40 records of 1 MiB: a pack as large as the store writes (64 MiB packs by default)
    records = [os.urandom(MiB) for _ in range(40)]
    name, path = sealed_file(tmp_path, records)
    size = path.stat().st_size
    assert size > 40 * MiB
    packs.put(name, path)
    stat = packs.stat(name)
    assert stat is not None
    assert stat.size == size
    assert read_trailer(packs, name) == read_file_trailer(path, name)
    # as the index is rebuilt from a pack: footer, then trailer, then every record
    footer = packs.read(name, size - fmt.PACK_FOOTER.size, fmt.PACK_FOOTER.size)
    _, _, count, crc, trailer_offset = fmt.PACK_FOOTER.unpack(footer)
    assert count == len(records)
    trailer = packs.read(name, trailer_offset, count * fmt.TRAILER_ENTRY.size)
    assert fmt.crc32(trailer) == crc
    buffer = memoryview(bytearray(2 * MiB))  # as a restore reads: into its pool's buffers
    for record, (_, offset, length, _) in zip(
        records, fmt.TRAILER_ENTRY.iter_unpack(trailer), strict=True
    ):
        assert packs.read(name, offset, length) == record
        assert packs.read_into(name, offset, buffer[:length]) == length
        assert buffer[:length] == record
    # and whole, in 8 MiB ranges
    digest = hashlib.sha256()
    for offset in range(0, size, 8 * MiB):
        digest.update(packs.read(name, offset, 8 * MiB))
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def get_requests(packs: PackObjects) -> int:
    return packs.counters.snapshot()["get"].requests


def test_read_tail_gives_the_size_and_the_last_bytes(packs: PackObjects, tmp_path: Path) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(3000)])
    packs.put(name, path)
    data = path.read_bytes()
    assert packs.read_tail(name, 100) == (len(data), data[-100:])
    assert packs.read_tail(name, len(data) + 1000) == (len(data), data)


def test_a_trailer_reads_in_one_request(packs: PackObjects, tmp_path: Path) -> None:
    name, path = sealed_file(tmp_path, [os.urandom(n) for n in (10, 2000, 70_000, 1)])
    packs.put(name, path)
    before = get_requests(packs)
    assert read_trailer(packs, name) == read_file_trailer(path, name)
    assert get_requests(packs) - before == 1


def test_a_trailer_longer_than_the_tail_read_takes_two(packs: PackObjects, tmp_path: Path) -> None:
    count = TAIL_READ // fmt.TRAILER_ENTRY.size + 100
    name, path = sealed_file(tmp_path, [os.urandom(16) for _ in range(count)])
    packs.put(name, path)
    before = get_requests(packs)
    size, entries = read_trailer(packs, name)
    assert (size, entries) == read_file_trailer(path, name)
    assert len(entries) == count
    assert get_requests(packs) - before == 2


def test_a_pack_that_is_not_one_is_named_corrupt(packs: PackObjects, tmp_path: Path) -> None:
    name = new_pack_name()
    packs.put(name, other_file(tmp_path, "garbage", os.urandom(5000)))
    with pytest.raises(CorruptPack, match=name):
        read_trailer(packs, name)
    tiny = new_pack_name()
    packs.put(tiny, other_file(tmp_path, "tiny", b"TSPK"))
    with pytest.raises(CorruptPack, match="only 4 bytes long"):
        read_trailer(packs, tiny)
