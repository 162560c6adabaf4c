"""Issue 12, items 3 and 4, through the real CLI: a damaged pack trailer costs no record (and
is found by verify, re-sealed by repair); a missing or garbage ``index.db`` / ``catalog.db``
is a finding and is rebuilt; a full disk gives a clear error, never a traceback."""

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.ids import short
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.store.pack import pack_path
from tests.cli import Cli
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot

pytestmark = pytest.mark.integration

CLI = Cli(passphrase=PASSPHRASE.decode(), no_traceback=True)
tessera = CLI.run

CHUNK = 64 * 1024
RECORDS = 16


def run(code: int, *args: str | Path) -> str:
    proc = tessera(*args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout


Disks = tuple[Path, dict[str, tuple[Manifest, bytes]]]


def make(path: Path) -> Disks:
    """Two snapshots; vm-a's 16 random chunks fill one pack of their own."""
    Store.init(path, chunk_size=CHUNK, pack_size=32 * CHUNK, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    a = os.urandom(RECORDS * CHUNK)
    b = realistic_bytes(12 * CHUNK, seed=9)
    with Store.open(path, passphrase=PASSPHRASE) as s:
        ma = write_snapshot(s, "vm-a", {"d": a})
        mb = write_snapshot(s, "vm-b", {"d": b})
    return path, {"vm-a": (ma, a), "vm-b": (mb, b)}


def restores_identical(path: Path, snaps: dict[str, tuple[Manifest, bytes]]) -> None:
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        for m, data in snaps.values():
            assert read_disk(s, s.manifest(m.snapshot_id)) == data


def pack_of(path: Path, m: Manifest) -> tuple[Path, list[bytes]]:
    """The pack of the snapshot's first chunk and the snapshot's chunk ids in it."""
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        with s.open_diskmap(m, m.disks[0]) as dm:
            ids = [c for _, c in dm.iter_ids()]
        locs = [s.index.lookup(c) for c in ids]
        name = locs[0].pack  # type: ignore[union-attr]
        assert all(loc is not None and loc.pack == name for loc in locs)
    return pack_path(path / "packs", name), ids


def flip(pack: Path, offset: int) -> None:
    with pack.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x20]))


def trailer_offset(pack: Path) -> int:
    raw = pack.read_bytes()
    return int(fmt.PACK_FOOTER.unpack(raw[-fmt.PACK_FOOTER.size :])[-1])


@pytest.fixture
def store(tmp_path: Path) -> Disks:
    return make(tmp_path / "store")


# --- item 3: a damaged trailer ---------------------------------------------------------------


def test_flipped_trailer_byte_is_found_and_costs_no_record(store: Disks) -> None:
    path, snaps = store
    pack, ids = pack_of(path, snaps["vm-a"][0])
    flip(pack, trailer_offset(pack) + 5 * fmt.TRAILER_ENTRY.size + 3)  # inside entry 5's id

    doc = json.loads(run(3, "store", "verify", path, "--data", "--json"))
    trailer = [f for f in doc["findings"] if f["kind"] == "trailer"]
    assert [f["subject"] for f in trailer] == [pack.stem], doc["findings"]
    assert "damaged trailer" in trailer[0]["message"]

    out = run(3, "store", "rebuild-index", path)  # 3: the pack still needs a re-seal
    assert f"pack {pack.stem}: damaged trailer" in out and f"{RECORDS} intact records" in out
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        assert all(s.index.lookup(c) is not None for c in ids)
    restores_identical(path, snaps)

    out = run(0, "store", "repair", path)
    assert f"re-sealed pack {pack.stem}" in out and f"{RECORDS} records kept" in out
    assert "nothing is lost" in out
    assert (path / "quarantine" / pack.name).exists() and not pack.exists()
    restores_identical(path, snaps)
    assert run(0, "store", "verify", path, "--data")
    proc = tessera("store", "info", path)  # a writable open warns no more
    assert proc.returncode == 0 and "recovery" not in proc.stderr


def test_repair_alone_keeps_every_record_of_a_pack_with_a_flipped_trailer(store: Disks) -> None:
    path, snaps = store
    pack, _ = pack_of(path, snaps["vm-a"][0])
    flip(pack, trailer_offset(pack) + 7)
    doc = json.loads(run(0, "store", "repair", path, "--json"))
    assert [(r["pack"], r["kept"], r["lost"]) for r in doc["resealed"]] == [
        (pack.stem, RECORDS, [])
    ]
    assert doc["quarantined"] == [] and not doc["lost"]
    restores_identical(path, snaps)
    run(0, "store", "verify", path, "--data")


def test_damaged_record_and_trailer_lose_only_that_record(store: Disks) -> None:
    path, snaps = store
    ma, _ = snaps["vm-a"]
    pack, ids = pack_of(path, ma)
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        victim = ids[6]
        loc = s.index.lookup(victim)
        assert loc is not None
    flip(pack, loc.offset + 200)  # inside the payload of record 6
    flip(pack, trailer_offset(pack) + 1)

    out = run(3, "store", "repair", path)
    assert f"re-sealed pack {pack.stem}" in out and f"{RECORDS - 1} records kept" in out
    assert f"chunk {short(victim)}" in out and ma.snapshot_id in out
    assert f"lost: 1 snapshots have missing or damaged data: {ma.snapshot_id}" in out
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        assert s.index.lookup(victim) is None
        assert all(s.index.lookup(c) is not None for c in ids if c != victim)
        assert read_disk(s, s.manifest(snaps["vm-b"][0].snapshot_id)) == snaps["vm-b"][1]
    doc = json.loads(run(3, "store", "verify", path, "--data", "--json"))
    missing = [f for f in doc["findings"] if f["kind"] == "missing-chunk"]
    assert [(f["subject"], f["snapshots"]) for f in missing] == [(short(victim), [ma.snapshot_id])]
    assert doc["damaged"] == [ma.snapshot_id] and doc["vms"] == ["vm-a"]


# --- item 4: the SQLite files --------------------------------------------------------------


def test_index_db_deleted(store: Disks) -> None:
    path, snaps = store
    (path / "index.db").unlink()
    out = run(3, "store", "verify", path, "--data")
    assert "database: index.db is missing" in out
    out = run(0, "store", "rebuild-index", path)
    assert "index.db is missing: rebuilt from the packs" in out
    run(0, "store", "verify", path, "--data")
    restores_identical(path, snaps)


def test_index_db_garbage(store: Disks) -> None:
    path, snaps = store
    (path / "index.db").write_bytes(os.urandom(8192))
    for side in ("index.db-wal", "index.db-shm"):
        (path / side).unlink(missing_ok=True)
    doc = json.loads(run(3, "store", "verify", path, "--json"))
    db = [f for f in doc["findings"] if f["kind"] == "database"]
    assert [f["subject"] for f in db] == [str(path / "index.db")]
    assert "not a database" in db[0]["message"]
    out = run(0, "store", "repair", path)
    assert "index.db is not a database" in out and "moved aside to index.db.damaged-" in out
    assert list(path.glob("index.db.damaged-*"))  # the evidence is kept
    run(0, "store", "verify", path, "--data")
    restores_identical(path, snaps)


def test_catalog_db_deleted_and_garbage(store: Disks) -> None:
    path, snaps = store
    (path / "catalog.db").unlink()
    out = run(3, "store", "verify", path)
    assert "database: catalog.db is missing" in out and "verified 2 snapshots" in out
    with Store.open(path, passphrase=PASSPHRASE) as s:  # a writable open rebuilds it
        assert s.report.files == ["catalog.db is missing: rebuilt from the manifests"]
        assert len(s.snapshots()) == 2
    run(0, "store", "verify", path, "--data")
    (path / "catalog.db").write_bytes(b"garbage" * 1000)
    for side in ("catalog.db-wal", "catalog.db-shm"):
        (path / side).unlink(missing_ok=True)
    run(3, "store", "verify", path)
    out = run(0, "store", "repair", path)
    assert "catalog.db is not a database" in out
    run(0, "store", "verify", path)
    restores_identical(path, snaps)


# --- item 4: a full disk ---------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (root only; skipped where mounting is impossible)."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        # CI runs as root, as the tests/faults full-disk tests need too: a failed mount is
        # a broken test machine, never a reason to skip the full-disk case.
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> None:
    """Fill the file system to the last byte (unbuffered writes until ENOSPC)."""
    for name, block in (("filler", 64 * 1024), ("filler2", 1)):
        with (fs / name).open("ab", buffering=0) as f:
            try:
                while f.write(bytes(block)):
                    pass
            except OSError:
                pass


def test_full_disk(small_fs: Path, tmp_path: Path) -> None:
    path, snaps = make(small_fs / "store")
    fill(small_fs)
    proc = tessera("store", "verify", path, "--data")  # reads and reports; warns on writes
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning: verify state" in proc.stderr and "ENOSPC" in proc.stderr
    assert "ok" in proc.stdout

    (path / "catalog.db").unlink()  # a rebuild now needs space it does not have
    fill(small_fs)
    for args in (("store", "rebuild-index", path), ("store", "repair", path)):
        proc = tessera(*args)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert str(path) in proc.stderr, proc.stderr
        assert "ENOSPC" in proc.stderr or "SQLITE_FULL" in proc.stderr, proc.stderr

    for filler in ("filler", "filler2"):
        (small_fs / filler).unlink()
    run(0, "store", "rebuild-index", path)
    run(0, "store", "verify", path, "--data")
    restores_identical(path, snaps)
    shutil.rmtree(path)
