"""The golden store of format v1, opened by today's code.

``store-v1/store/`` was made once by ``make_store_v1.py`` (its docstring says how: two VMs,
four snapshots — full, incremental, differential — with dedup within a disk, across VMs
and across snapshots, zero runs, short last slots, compressed and raw records, AES-256-GCM
with a passphrase) and committed as bytes; ``store-v1/expected.json`` holds what was
written, with the SHA-256 of every disk computed from the plaintext at generation time.
These tests open a copy of the committed bytes, verify every record, list the snapshots,
restore every disk and compare the digests; they rebuild the index from the packs and the
catalog from the manifests alone, and check that a writable open finds nothing to recover.

Every later format version must keep passing this test, unchanged: a version that cannot
open, verify and restore a v1 store has lost the backups its users already have. Never
regenerate ``store-v1/``; a new format version adds a golden store of its own beside it.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.core.ids import ZERO_ID, ChunkId
from engine.maint.verify import VerifyOptions, verify
from engine.restore.disk import restore_disk
from engine.sources.types import DiskInfo
from engine.store.chunk_store import Store
from engine.workers import ThreadCpuPool

GOLDEN = Path(__file__).parent / "store-v1"
EXPECTED: dict[str, Any] = json.loads((GOLDEN / "expected.json").read_text())
PASSPHRASE = EXPECTED["passphrase"].encode()
SNAPSHOTS: list[dict[str, Any]] = EXPECTED["snapshots"]


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    """A copy of the committed store: opening a store writes beside it (SQLite's shared
    memory file, verify's state, the writer lock), and the committed bytes stay as made."""
    copy = tmp_path / "store"
    shutil.copytree(GOLDEN / "store", copy)
    return copy


def sha256_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_committed_files_are_the_bytes_that_were_made() -> None:
    """Nothing rewrote the golden store (a test that opened it in place, a line-ending
    filter): every other test here would then prove less than it says."""
    assert sha256_files(GOLDEN / "store") == EXPECTED["files"]


def test_verify_with_data_finds_nothing(golden: Path) -> None:
    with Store.open(golden, passphrase=PASSPHRASE, writable=False) as store:
        assert store.db_problems == {}
        result = verify(store, VerifyOptions(data=True, mark=False))
    assert result.findings == []
    assert result.warnings == []
    assert result.snapshots == len(SNAPSHOTS)
    assert result.packs_checked == result.packs_total == EXPECTED["store"]["packs"]
    assert result.chunks_checked == EXPECTED["store"]["chunks"]


def test_lists_the_snapshots_as_written(golden: Path) -> None:
    with Store.open(golden, passphrase=PASSPHRASE, writable=False) as store:
        info = store.info()
        assert info.format == EXPECTED["format"]
        for key in ("store_id", "chunk_size", "encryption", "pack_size", "chunks", "packs"):
            assert getattr(info, key) == EXPECTED["store"][key], key
        entries = store.snapshots()
        by_vm = sorted(SNAPSHOTS, key=lambda s: (s["vm_name"], s["time"]))
        assert [e.snapshot_id for e in entries] == [s["snapshot_id"] for s in by_vm]
        for entry, want in zip(entries, by_vm, strict=True):
            assert (entry.vm_id, entry.vm_name, entry.level) == (
                want["vm_id"],
                want["vm_name"],
                want["level"],
            )
            m = store.manifest(entry.snapshot_id)
            assert m.format == EXPECTED["format"]
            assert (m.parent, m.time, m.consistency, m.tags) == (
                want["parent"],
                want["time"],
                want["consistency"],
                want["tags"],
            )
            assert [(d.disk_id, d.name, d.size, d.attributes) for d in m.disks] == [
                (d["disk_id"], d["name"], d["size"], d["attributes"]) for d in want["disks"]
            ]
            assert m.config is not None and m.config.format == want["config"]["format"]
            config = store.read_chunk(ChunkId(bytes.fromhex(m.config.chunk_id)))
            assert hashlib.sha256(config).hexdigest() == want["config"]["sha256"]
        assert [e.vm_name for e in store.snapshots("beta")] == ["beta", "beta"]
        assert store.resolve(SNAPSHOTS[0]["snapshot_id"][:6]) == SNAPSHOTS[0]["snapshot_id"]


class _Target:
    """A restore target in memory, filled with garbage so zero slots must be written."""

    def __init__(self, size: int):
        self.info = DiskInfo("target", "target", size)
        self.fresh = False
        self.data = bytearray(b"\xa5") * size

    async def open_writer(self) -> "_Target":
        return self

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_every_disk_restores_to_its_digest(golden: Path) -> None:
    restored = 0
    with Store.open(golden, passphrase=PASSPHRASE, writable=False) as store:
        pool = ThreadCpuPool(store.keys, store.config.chunk_size, workers=2, capacity=4)
        try:
            for want in SNAPSHOTS:
                manifest = store.manifest(want["snapshot_id"])
                for disk, expected in zip(manifest.disks, want["disks"], strict=True):
                    with store.open_diskmap(manifest, disk) as dm:
                        zeros = sum(cid == ZERO_ID for _, cid in dm.iter_ids())
                    assert zeros == expected["zero_slots"], disk.name
                    target = _Target(disk.size)
                    stats = await restore_disk(store, pool, manifest, disk, target, writers=2)
                    assert stats.bytes_restored == expected["size"]
                    digest = hashlib.sha256(target.data).hexdigest()
                    assert digest == expected["sha256"], f"{want['snapshot_id']} {disk.name}"
                    restored += 1
        finally:
            await pool.aclose()
    assert restored == sum(len(s["disks"]) for s in SNAPSHOTS) == 6


def test_a_writable_open_finds_nothing_to_recover(golden: Path) -> None:
    with Store.open(golden, passphrase=PASSPHRASE) as store:
        assert store.report.lines() == []
        assert len(store.snapshots()) == len(SNAPSHOTS)


def test_index_and_catalog_rebuild_from_the_packs_and_manifests(golden: Path) -> None:
    """The SQLite files are caches: the v1 pack trailers and manifests alone rebuild them."""
    (golden / "index.db").unlink()
    (golden / "catalog.db").unlink()
    with Store.open(golden, passphrase=PASSPHRASE) as store:
        report = store.report
        assert report.files == [
            "index.db is missing: rebuilt from the packs",
            "catalog.db is missing: rebuilt from the manifests",
        ]
        assert len(report.indexed_packs) == EXPECTED["store"]["packs"]
        assert report.scanned == []  # every trailer read: no record had to be scanned
        assert report.catalog_added == len(SNAPSHOTS)
        assert store.info().chunks == EXPECTED["store"]["chunks"]
        assert sorted(e.snapshot_id for e in store.snapshots()) == sorted(
            s["snapshot_id"] for s in SNAPSHOTS
        )
        result = verify(store, VerifyOptions(data=True, mark=False))
    assert result.findings == []
    assert result.chunks_checked == EXPECTED["store"]["chunks"]
