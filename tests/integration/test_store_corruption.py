"""Damage to a store: each kind gives a clear error naming the pack / chunk / snapshot, and
never a wrong plaintext. Checked through the API and through ``tessera store verify``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.errors import CorruptRecord, KeyFileError, ManifestTampered, StoreError
from engine.core.ids import short
from engine.store.chunk_store import Store
from engine.store.keys import KdfParams, StoreKeys, write_key_file
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, str, str]:
    """A store with two snapshots sharing chunks; returns (path, snapshot a, snapshot b)."""
    path = tmp_path / "store"
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    with Store.open(path, passphrase=PASSPHRASE) as s:
        disk = realistic_bytes(12 * CHUNK, seed=5)
        a = write_snapshot(s, "vm-a", {"d": disk})
        b = write_snapshot(s, "vm-b", {"d": disk[: 6 * CHUNK] + os.urandom(6 * CHUNK)})
    return path, a.snapshot_id, b.snapshot_id


def verify(
    path: Path, *args: str, env_pass: bytes = PASSPHRASE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "store", "verify", str(path), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TESSERA_PASSPHRASE": env_pass.decode()},
        timeout=120,
        check=False,
    )


def the_pack(path: Path) -> Path:
    return sorted((path / "packs").glob("??/*.pack"))[0]


def test_clean_store_verifies(store: tuple[Path, str, str]) -> None:
    proc = verify(store[0], "--data")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["snapshots"] == 2 and doc["chunks_checked"] > 0


def test_flipped_byte_in_pack(store: tuple[Path, str, str]) -> None:
    path, a, b = store
    pack = the_pack(path)
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        cid, loc = next((c, loc) for c, loc in s.index.iter_chunks() if loc.pack == pack.stem)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 60] ^= 0x01
    pack.write_bytes(raw)
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        with pytest.raises(CorruptRecord) as e:
            s.read_chunk(cid)
        assert short(cid) in str(e.value) and pack.stem in str(e.value)
        assert f"offset {loc.offset}" in str(e.value)
    proc = verify(path, "--data")
    assert proc.returncode == 3
    doc = json.loads(proc.stdout)
    bad = [f for f in doc["findings"] if f["kind"] == "bad-chunk"]
    assert bad and bad[0]["subject"] == short(cid) and pack.stem in bad[0]["message"]
    assert set(bad[0]["snapshots"]) <= {a, b} and bad[0]["snapshots"]


def test_truncated_pack(store: tuple[Path, str, str]) -> None:
    path, a, b = store
    pack = the_pack(path)
    os.truncate(pack, pack.stat().st_size // 2)
    proc = verify(path, "--data")  # read-only: the index still names the pack
    assert proc.returncode == 3
    assert f"pack {pack.stem} has" in proc.stdout
    # A writable open drops the entries, reports them, and verify names the snapshots.
    with Store.open(path, passphrase=PASSPHRASE) as s:
        assert any(pack.stem in p for p in s.report.problems)
    doc = json.loads(verify(path).stdout)
    missing = [f for f in doc["findings"] if f["kind"] == "missing-chunk"]
    assert missing and {sid for f in missing for sid in f["snapshots"]} <= {a, b}


def test_deleted_pack(store: tuple[Path, str, str]) -> None:
    path, a, _ = store
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        m = s.manifest(a)
        with s.open_diskmap(m, m.disks[0]) as dm:
            first = dm.get(0)
        pack = s.index.lookup(first).pack  # type: ignore[union-attr]
    (path / "packs" / pack[:2] / f"{pack}.pack").unlink()
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        with pytest.raises(StoreError, match=f"pack {pack} of chunk {short(first)} is missing"):
            read_disk(s, s.manifest(a))
    proc = verify(path)
    assert proc.returncode == 3


def test_tampered_manifest(store: tuple[Path, str, str]) -> None:
    path, a, _ = store
    manifest = path / "snapshots" / a / "manifest"
    manifest.write_bytes(
        manifest.read_bytes().replace(b'"level":"full"', b'"level":"differential"')
    )
    with Store.open(path, passphrase=PASSPHRASE, writable=False) as s:
        with pytest.raises(ManifestTampered, match=a):
            s.manifest(a)
    doc = json.loads(verify(path).stdout)
    assert doc["findings"][0]["kind"] == "manifest" and doc["findings"][0]["snapshots"] == [a]


def test_tampered_diskmap(store: tuple[Path, str, str]) -> None:
    path, a, _ = store
    dmap = path / "snapshots" / a / "disk-0.dmap"
    raw = bytearray(dmap.read_bytes())
    raw[-1] ^= 0xFF
    dmap.write_bytes(raw)
    doc = json.loads(verify(path).stdout)
    assert doc["findings"][0]["kind"] == "diskmap" and a in doc["findings"][0]["subject"]


def test_wrong_passphrase(store: tuple[Path, str, str]) -> None:
    path = store[0]
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        Store.open(path, passphrase=b"nope", writable=False)
    proc = verify(path, env_pass=b"nope")
    assert proc.returncode == 2
    assert "keys/key: wrong passphrase" in proc.stderr


def test_another_stores_key_file(store: tuple[Path, str, str], tmp_path: Path) -> None:
    path = store[0]
    config = json.loads((path / "config.json").read_text())
    # Same store id, different keys: AEAD refuses every record, MAC refuses every manifest.
    other = tmp_path / "otherkey"
    write_key_file(
        other, StoreKeys.generate(True), config["store_id"], PASSPHRASE, KdfParams(n=2**10)
    )
    with Store.open(path, passphrase=PASSPHRASE, key_file=other, writable=False) as s:
        with pytest.raises(ManifestTampered):
            s.manifest(store[1])
        cid, _ = next(iter(s.index.iter_chunks()))
        with pytest.raises(CorruptRecord, match="AES-GCM authentication failed"):
            s.read_chunk(cid)
    # A key file of a different store is refused by name.
    write_key_file(other, StoreKeys.generate(True), "someone-else", PASSPHRASE, KdfParams(n=2**10))
    with pytest.raises(KeyFileError, match="belongs to store 'someone-else'"):
        Store.open(path, passphrase=PASSPHRASE, key_file=other, writable=False)
