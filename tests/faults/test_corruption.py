"""Corruption of every file kind the store keeps: pack body (record payload and header),
pack trailer, pack footer, a truncated pack, index, catalog, manifest, DiskMap, key file and
a job journal record.

Each case asserts the same three things:

1. what touches the damage fails clearly, naming the object (never a traceback or wrong
   bytes), or succeeds because the damaged file was a cache or a convenience;
2. every committed snapshot the damage does not reach reads back byte-identical, and after
   the repair the store offers (open = recover, ``repair``) everything that could be kept is
   kept — a damaged trailer or SQLite file costs nothing;
3. verify names exactly what was damaged: the file, and the snapshots that lost data.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.core.errors import EngineError, KeyFileError
from engine.jobs.journal import Journal
from engine.jobs.recovery import recover_unfinished
from engine.maint.repair import repair
from engine.maint.verify import VerifyOptions, VerifyResult, verify
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.store.pack import pack_path, read_trailer
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.faults.harness import record_case
from tests.helpers import read_disk, realistic_bytes, write_snapshot

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024

Snaps = dict[str, tuple[Manifest, bytes]]  # vm → (manifest, disk bytes)


def build(path: Path) -> Snaps:
    """Three VMs; vm-a and vm-b share half their chunks, vm-c shares nothing."""
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    shared = os.urandom(8 * CHUNK)
    disks = {
        "vm-a": shared + os.urandom(8 * CHUNK),
        "vm-b": shared + realistic_bytes(8 * CHUNK, seed=3),
        "vm-c": os.urandom(16 * CHUNK),
    }
    with Store.open(path, passphrase=PASSPHRASE) as s:
        return {vm: (write_snapshot(s, vm, {"d": data}), data) for vm, data in disks.items()}


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def pack_of(store_path: Path, snaps: Snaps, vm: str) -> tuple[str, int, int]:
    """(pack, offset, length) of the first chunk of ``vm``'s disk that only it references."""
    with Store.open(store_path, passphrase=PASSPHRASE, writable=False) as s:
        manifest = snaps[vm][0]
        with s.open_diskmap(manifest, manifest.disks[0]) as dm:
            cid = dm.get(dm.slots - 1)
        loc = s.index.lookup(cid)
        assert loc is not None
        return loc.pack, loc.offset, loc.length


def a_pack(store_path: Path, snaps: Snaps, vm: str = "vm-c") -> Path:
    name, _, _ = pack_of(store_path, snaps, vm)
    return pack_path(store_path / "packs", name)


def readable(store: Store, snaps: Snaps) -> tuple[set[str], int]:
    """(VMs whose snapshot cannot be read — with a clear error; how many read back wrong)."""
    failed, wrong = set(), 0
    for vm, (manifest, data) in snaps.items():
        try:
            got = read_disk(store, store.manifest(manifest.snapshot_id))
        except EngineError:
            failed.add(vm)
            continue
        wrong += got != data
    return failed, wrong


def named(result: VerifyResult) -> set[str]:
    """The VMs verify names as damaged."""
    return set(result.vms) | {vm for f in result.findings for vm in f.vms}


# Each damage function corrupts the store and returns (VMs whose data it destroys, the
# object verify must name, whether repair is needed to get back everything else).
Damage = Callable[[Path, Snaps], tuple[set[str], str]]


def record_payload(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    name, offset, _ = pack_of(path, snaps, "vm-c")
    flip(pack_path(path / "packs", name), offset + fmt.RECORD_HEADER.size + 20)
    return {"vm-c"}, "bad-chunk"


def record_header(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    name, offset, _ = pack_of(path, snaps, "vm-a")
    flip(pack_path(path / "packs", name), offset + 1)  # inside the record magic
    return {"vm-a"}, "bad-chunk"


def trailer(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    pack = a_pack(path, snaps)
    size = pack.stat().st_size
    flip(pack, size - fmt.PACK_FOOTER.size - fmt.TRAILER_ENTRY.size + 3)
    return set(), pack.stem


def footer(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    pack = a_pack(path, snaps)
    flip(pack, pack.stat().st_size - fmt.PACK_FOOTER.size + 1)
    return set(), pack.stem


def truncated(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    pack = a_pack(path, snaps)
    size, entries = read_trailer(pack, pack.stem)
    os.truncate(pack, size - 30)  # the footer and part of the trailer: no record is cut
    assert entries
    return set(), pack.stem


def index_garbage(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    (path / "index.db").write_bytes(os.urandom(8192))
    for side in path.glob("index.db-*"):
        side.unlink()
    return set(), "index.db"


def index_deleted(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    for f in path.glob("index.db*"):
        f.unlink()
    return set(), "index.db"


def catalog_garbage(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    (path / "catalog.db").write_bytes(b"not a database" * 100)
    return set(), "catalog.db"


def catalog_deleted(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    for f in path.glob("catalog.db*"):
        f.unlink()
    return set(), "catalog.db"


def manifest(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    sid = snaps["vm-b"][0].snapshot_id
    target = path / "snapshots" / sid / "manifest"
    flip(target, target.stat().st_size - 10)
    return {"vm-b"}, sid


def diskmap(path: Path, snaps: Snaps) -> tuple[set[str], str]:
    sid = snaps["vm-a"][0].snapshot_id
    target = next((path / "snapshots" / sid).glob("*.dmap"))
    flip(target, target.stat().st_size - 5)
    return {"vm-a"}, sid


KINDS: dict[str, Damage] = {
    "pack record payload": record_payload,
    "pack record header": record_header,
    "pack trailer": trailer,
    "pack footer": footer,
    "pack truncated": truncated,
    "index garbage": index_garbage,
    "index deleted": index_deleted,
    "catalog garbage": catalog_garbage,
    "catalog deleted": catalog_deleted,
    "manifest": manifest,
    "diskmap": diskmap,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_corruption(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "store"
    snaps = build(path)
    destroyed, subject = KINDS[kind](path, snaps)

    # 3. a read-only verify (beside a daemon, as operators run it) names exactly the damage
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as ro:
        found = verify(ro, VerifyOptions(data=True, mark=False))
    assert not found.ok, f"{kind} went unnoticed"
    assert any(subject in (f.kind, f.subject) or subject in f.message for f in found.findings), (
        subject,
        found.findings,
    )
    assert named(found) == destroyed, found.findings

    # 2. open = recover, then repair: everything the damage did not destroy is kept
    with Store.open(path, passphrase=PASSPHRASE) as store:
        result = repair(store)
        failed, wrong = readable(store, snaps)
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as ro:
        after = verify(ro, VerifyOptions(data=True, mark=False))
    # 1. never wrong bytes; what cannot be read is exactly what was destroyed
    undetected = wrong + len(failed - destroyed)
    record_case(
        "corruption of file kinds",
        kind,
        detected=int(not found.ok),
        lost=wrong + len(failed - destroyed),
        undetected=undetected,
        committed=len(snaps),
    )
    assert wrong == 0
    assert failed == destroyed, (failed, result.verify.findings)
    assert named(after) == destroyed, after.findings
    assert after.ok == (not destroyed), after.findings


def test_corrupt_key_file(tmp_path: Path) -> None:
    path = tmp_path / "store"
    snaps = build(path)
    key = path / "keys" / "key"
    saved = key.read_bytes()
    flip(key, len(saved) // 2)
    with pytest.raises(KeyFileError) as raised:
        Store.open(path, passphrase=PASSPHRASE)
    assert str(key) in str(raised.value)
    key.write_bytes(saved)  # the key file's backup (the operator keeps one): nothing lost
    with Store.open(path, passphrase=PASSPHRASE) as store:
        failed, wrong = readable(store, snaps)
        result = verify(store, VerifyOptions(data=True, mark=False))
    record_case(
        "corruption of file kinds",
        "key file",
        detected=1,
        lost=wrong + len(failed),
        undetected=wrong,
        committed=len(snaps),
    )
    assert not failed and not wrong and result.ok


async def test_corrupt_journal_record(tmp_path: Path) -> None:
    path = tmp_path / "store"
    snaps = build(path)
    journal = Journal(path / "journal")
    record = await journal.create("backup", "local", {"image": "/nonexistent"})
    bad = path / "journal" / f"{record.job_id}.json"
    bad.write_bytes(b'{"job_id": "torn')
    with Store.open(path, passphrase=PASSPHRASE) as store:
        lines = await recover_unfinished(store, Journal(path / "journal"))
        failed, wrong = readable(store, snaps)
    assert any(record.job_id in line and "unreadable" in line for line in lines), lines
    assert not bad.exists() and bad.with_name(bad.name + ".damaged").exists()
    record_case(
        "corruption of file kinds",
        "journal record",
        detected=1,
        lost=wrong + len(failed),
        undetected=wrong,
        committed=len(snaps),
    )
    assert not failed and not wrong
    shutil.rmtree(path)
