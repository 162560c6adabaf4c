"""Crash consistency: a writer SIGKILLed at chosen points, then the store is reopened.

Every committed snapshot must read back byte-identical, nothing uncommitted may be visible,
verify (with data) must be clean, and the next write must succeed. The failpoint must really
be reached (the writer dies by SIGKILL), so no case can pass vacuously.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.maint.check import check_store
from engine.store.chunk_store import Store
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, realistic_bytes, write_snapshot
from tests.integration.crash_writer import disks_b

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]

# (failpoint, nth hit, is snapshot B committed when the writer dies there?)
KILL_POINTS = [
    ("store.record.mid_write", 1, False),
    ("store.record.mid_write", 25, False),
    ("store.record.after_write", 7, False),
    ("store.pack.before_trailer", 1, False),
    ("store.pack.mid_trailer", 1, False),
    ("store.pack.before_fsync", 1, False),
    ("store.pack.before_rename", 1, False),
    ("store.pack.after_rename", 1, False),
    ("store.pack.after_dir_fsync", 1, False),
    ("store.index.before_commit", 1, False),
    ("store.index.after_commit", 1, False),
    ("store.pack.before_rename", 2, False),
    ("store.index.before_commit", 2, False),
    ("store.snapshot.after_flush", 1, False),
    ("store.diskmap.before_fsync", 1, False),
    ("store.diskmap.after_rename", 1, False),
    ("store.diskmap.after_rename", 2, False),
    ("store.snapshot.before_manifest", 1, False),
    ("store.manifest.mid_write", 1, False),
    ("store.manifest.before_fsync", 1, False),
    ("store.manifest.before_rename", 1, False),
    ("store.manifest.after_rename", 1, True),
    ("store.catalog.before_commit", 1, True),
]


def run_writer(
    store: Path, point: str, nth: int, seed: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.crash_writer",
            str(store),
            point,
            str(nth),
            str(seed),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def store_with_a(tmp_path: Path) -> tuple[Path, str, bytes]:
    path = tmp_path / "store"
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    disk_a = realistic_bytes(24 * CHUNK, seed=100)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        m = write_snapshot(store, "vm-a", {"d0": disk_a})
    return path, m.snapshot_id, disk_a


def assert_consistent(path: Path, snap_a: str, disk_a: bytes, expect_b: bool, seed: int) -> None:
    with Store.open(path, passphrase=PASSPHRASE) as store:
        snaps = {e.vm_name: e.snapshot_id for e in store.snapshots()}
        assert read_disk(store, store.manifest(snap_a)) == disk_a
        assert ("vm-b" in snaps) == expect_b, store.report.lines()
        if expect_b:
            mb = store.manifest(snaps["vm-b"])
            for i, data in enumerate(disks_b(seed, CHUNK).values()):
                assert read_disk(store, mb, i) == data
        assert not list((path / "packs" / "tmp").iterdir())
        assert not list(path.rglob("*.tmp"))
        result = check_store(store, data=True)
        assert result.ok, result.findings
        # The next write succeeds and reads back.
        disk_c = realistic_bytes(6 * CHUNK, seed=seed + 1)
        mc = write_snapshot(store, "vm-c", {"d0": disk_c})
        assert read_disk(store, mc) == disk_c


@pytest.mark.parametrize(
    ("point", "nth", "committed"), KILL_POINTS, ids=[f"{p}#{n}" for p, n, _ in KILL_POINTS]
)
def test_kill_writer(
    store_with_a: tuple[Path, str, bytes], point: str, nth: int, committed: bool
) -> None:
    path, snap_a, disk_a = store_with_a
    seed = 7
    proc = run_writer(path, point, nth, seed)
    assert proc.returncode == -signal.SIGKILL, (
        f"failpoint never reached: {proc.stdout}{proc.stderr}"
    )
    assert "committed" not in proc.stdout
    assert_consistent(path, snap_a, disk_a, committed, seed)


def test_writer_without_kill_commits(store_with_a: tuple[Path, str, bytes]) -> None:
    path, snap_a, disk_a = store_with_a
    proc = run_writer(path, "no.such.point", 1, 7)
    assert proc.returncode == 0, proc.stderr
    assert "committed" in proc.stdout
    assert_consistent(path, snap_a, disk_a, True, 7)


def test_kill_during_recovery(store_with_a: tuple[Path, str, bytes]) -> None:
    """A pack sealed but not indexed; the recovering open is itself killed while indexing it."""
    path, snap_a, disk_a = store_with_a
    assert run_writer(path, "store.pack.after_dir_fsync", 1, 7).returncode == -signal.SIGKILL
    proc = run_writer(path, "store.index.before_commit", 1, 7, "--during-open")
    assert proc.returncode == -signal.SIGKILL
    assert_consistent(path, snap_a, disk_a, False, 7)
