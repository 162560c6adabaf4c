"""ENOSPC and EIO at every write, fsync, rename and SQLite commit of a snapshot, in one
long-lived ``Store`` (as the daemon holds it): the faulted backup fails naming the store and
the errno (or, past its commit point, succeeds), the *next* backup in the same process
succeeds, every snapshot reported committed reads back byte-identical, the reopened store
recovers without dropping anything, and a data verify is clean.

The points and their hit counts come from one recorded run of the same backup, so a new
write in the store's commit path is faulted here without editing this file.
"""

from functools import cache
from pathlib import Path

import pytest

from engine.core.errors import EngineError
from engine.maint.verify import VerifyOptions, verify
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.faults.harness import Inject, Recorder, chosen_hits, installed, record_case
from tests.helpers import read_disk, realistic_bytes, write_snapshot

CHUNK = 64 * 1024
PACK = 1024 * 1024  # the minimum: a 3 MiB disk seals several packs in the background
# (``store.pack.before_shard_fsync`` is left out: whether a new pack needs a new shard
# directory depends on its random name; the window is the same as ``before_rename``.)
IO_STEPS = (
    "mid_write",
    "mid_trailer",
    "before_trailer",
    "before_fsync",
    "before_rename",
    "before_dir_fsync",
    "before_commit",
)


@cache
def disks(seed: int) -> dict[str, bytes]:
    """Two disks: one half shared with the baseline (dedup against sealed packs), one new."""
    base = realistic_bytes(24 * CHUNK, seed=1)
    return {
        "a": base[: 12 * CHUNK] + realistic_bytes(12 * CHUNK, seed=seed),
        "b": realistic_bytes(20 * CHUNK, seed=seed + 1000) + bytes(4 * CHUNK),
    }


def new_store(path: Path) -> Store:
    Store.init(path, chunk_size=CHUNK, pack_size=PACK, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    return Store.open(path, passphrase=PASSPHRASE)


@cache
def recorded(tmp: str = "/tmp") -> dict[str, int]:
    """Failpoints of one backup (after a baseline) with how often each is hit."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=tmp) as d:
        store = new_store(Path(d) / "store")
        try:
            write_snapshot(store, "vm", disks(0))
            rec = Recorder()
            with installed(rec):
                write_snapshot(store, "vm", disks(1))
        finally:
            store.close()
    return {name: n for name, n in rec.hits.items() if name.rsplit(".", 1)[-1] in IO_STEPS}


def cases() -> list[tuple[str, int, str]]:
    return [
        (point, nth, kind)
        for point, count in sorted(recorded().items())
        for nth in chosen_hits(count)
        for kind in ("ENOSPC", "EIO")
    ]


def check(store: Store, committed: list[tuple[Manifest, dict[str, bytes]]]) -> int:
    """How many of the committed snapshots do not read back identical (0 expected)."""
    lost = 0
    for manifest, data in committed:
        for i, disk in enumerate(manifest.disks):
            try:
                if read_disk(store, manifest, i) != data[disk.disk_id]:
                    lost += 1
            except EngineError:
                lost += 1
    return lost


@pytest.mark.parametrize(("point", "nth", "kind"), cases(), ids=lambda v: str(v))
def test_write_fault(tmp_path: Path, point: str, nth: int, kind: str) -> None:
    path = tmp_path / "store"
    store = new_store(path)
    committed = []
    try:
        committed.append((write_snapshot(store, "vm", disks(0)), disks(0)))
        inject = Inject(point, nth, kind)
        with installed(inject):
            try:
                manifest = write_snapshot(store, "vm", disks(1))
            except EngineError as e:
                error: EngineError | None = e
            else:
                error = None
                committed.append((manifest, disks(1)))
        assert inject.fired, f"{point} hit {nth} was not reached"
        if error is not None:
            # 1. a clear error: the store, the errno, no bare OSError/sqlite3 error
            assert str(path) in str(error) and kind in str(error), str(error)
        # the same process keeps working: a new pack, a committed snapshot
        after = write_snapshot(store, "vm", disks(2))
        committed.append((after, disks(2)))
        lost = check(store, committed)
    finally:
        store.close()
    # 2. reopened (open = recover): nothing dropped, everything committed still whole
    with Store.open(path, passphrase=PASSPHRASE) as reopened:
        assert not reopened.report.problems, reopened.report.lines()
        lost += check(reopened, committed)
        # 3. verify names exactly what was damaged: nothing
        result = verify(reopened, VerifyOptions(data=True, mark=False))
    undetected = 0 if result.ok else len(result.findings)
    record_case(
        "store write faults",
        f"{point}#{nth} {kind}",
        detected=1 if (error is not None or inject.fired) else 0,
        lost=lost,
        undetected=undetected,
        committed=len(committed),
    )
    assert lost == 0
    assert result.ok, result.findings
