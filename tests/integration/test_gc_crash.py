"""GC killed (SIGKILL) at each of its steps: the store stays consistent and a rerun finishes.

    python -m tests.integration.test_gc_crash STORE POINT N   (the GC subprocess)

After each kill the store is reopened (open = recover), every committed snapshot must read
back byte-identical and verify (with data) must be clean; a second GC must then complete:
exactly the referenced chunks stay, retired packs are in the trash and nowhere else.
"""

import random
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.core.ids import ZERO_ID
from engine.maint.check import check_store
from engine.maint.gc import GcOptions, GcResult, gc
from engine.maint.prune import REMOVED_DIR, prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from engine.util import failpoints
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import read_disk, sigkill_at

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.now(UTC) + timedelta(days=8)

KILL_POINTS = [
    ("gc.expire.unlinked", 1),
    ("gc.listed", 1),
    ("gc.marked", 1),
    ("gc.condemned", 1),
    ("gc.stamped", 1),
    ("gc.deleted", 1),
    ("store.record.after_write", 3),  # copying records into the new pack
    ("store.pack.before_rename", 1),
    ("store.pack.after_dir_fsync", 1),
    ("gc.repack.sealed", 1),
    ("gc.retire.linked", 1),
    ("gc.index.before_commit", 1),
    ("gc.retire.committed", 1),
    ("gc.retire.unlinked", 1),
    ("gc.retire.linked", 2),
    ("gc.retire.committed", 2),
]


def options() -> GcOptions:
    return GcOptions(now=lambda: NOW, repack_threshold=0.75, young_pack_margin=timedelta(0))


def chunks(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(CHUNK) for _ in range(n)]


def snapshot(store: Store, vm: str, data: list[bytes], when: datetime) -> Manifest:
    with store.begin_snapshot(vm_id=vm, vm_name=vm, level="full", time=when) as snap:
        dm = snap.add_disk("d", "d", len(data) * CHUNK)
        for slot, c in enumerate(data):
            dm.set(slot, store.put_chunk(c))
        return snap.commit()


@pytest.fixture
def garbage_store(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two VMs whose older snapshot was pruned (past its grace): half their chunks are
    garbage, spread over packs that become sparse (repack) or empty (trash)."""
    path = tmp_path / "store"
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    expected = {}
    with Store.open(path, passphrase=PASSPHRASE) as store:
        for vm, seed in (("a", 1), ("b", 2)):
            data = chunks(48, seed)  # 16 records fill a 1 MiB pack: 3 packs
            snapshot(store, vm, data, t0)
            kept = data[0:16:2] + data[40:48]  # packs 1 and 3 half live, pack 2 dead
            m = snapshot(store, vm, kept, t0 + timedelta(days=1))
            expected[m.snapshot_id] = b"".join(kept)
        prune(store, Rules(keep_last=1))
    return path, expected


def run_gc_process(store: Path, point: str, nth: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.integration.test_gc_crash", str(store), point, str(nth)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_consistent(store: Store, expected: dict[str, bytes]) -> None:
    assert sorted(e.snapshot_id for e in store.snapshots()) == sorted(expected)
    for sid, data in expected.items():
        assert read_disk(store, store.manifest(sid)) == data
    result = check_store(store, data=True)
    assert result.ok, result.findings


@pytest.mark.parametrize(("point", "nth"), KILL_POINTS)
def test_gc_killed_leaves_a_consistent_store_and_a_rerun_finishes(
    garbage_store: tuple[Path, dict[str, bytes]], point: str, nth: int
) -> None:
    path, expected = garbage_store
    proc = run_gc_process(path, point, nth)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)

    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert not store.report.problems, store.report.lines()
        assert_consistent(store, expected)
        rerun = gc(store, options())
        assert rerun.deferred_chunks == 0
        assert_consistent(store, expected)
        referenced: set[bytes] = set()
        for sid in expected:
            m = store.manifest(sid)
            with store.open_diskmap(m, m.disks[0]) as dm:
                referenced |= {cid for _, cid in dm.iter_ids() if cid != ZERO_ID}
        assert {cid for cid, _ in store.index.iter_chunks()} == referenced
        indexed = {p.name for p in store.index.packs()}
        assert set(store.layout.pack_files()) == indexed  # no stray pack
        assert not set(store.layout.trash_files()) & indexed
        assert not list((path / REMOVED_DIR).iterdir())
        assert gc(store, options()).packs_repacked == 0  # nothing left to do
    with Store.open(path, passphrase=PASSPHRASE) as store:
        assert store.report.lines() == []


def test_gc_in_one_go_for_reference(garbage_store: tuple[Path, dict[str, bytes]]) -> None:
    path, expected = garbage_store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        result: GcResult = gc(store, options())
        assert result.deleted_chunks == 64
        assert result.packs_repacked and result.packs_trashed
        assert_consistent(store, expected)


def main() -> None:
    store_path, point, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    store = Store.open(store_path, passphrase=PASSPHRASE)
    failpoints.install(sigkill_at(point, nth))
    gc(store, options())
    print("gc finished without reaching the failpoint", flush=True)
    store.close()


if __name__ == "__main__":
    main()
