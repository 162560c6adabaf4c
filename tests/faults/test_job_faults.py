"""ENOSPC and EIO at every write, fsync and rename of the job journal during a real backup
(a local qcow2 image through qemu-nbd), in a store that stays open as in the daemon.

The journal is written before each state is acted on, so a journal that cannot record a
working state stops the job there: it fails naming the journal file and the errno, and its
cleanup still runs (the qemu-nbd export stopped, the run's bitmap removed). A failure after
the commit point only costs a warning: the snapshot is committed and the job succeeded. The
next backup in the same process succeeds, and every committed snapshot restores identical.
"""

import asyncio
import json
from functools import cache
from pathlib import Path

import pytest

from engine.core.errors import EngineError
from engine.jobs.backup import BackupOutcome, run_backup
from engine.jobs.journal import Journal
from engine.jobs.states import State
from engine.maint.verify import VerifyOptions, verify
from engine.store.chunk_store import Store
from engine.workers import make_cpu_pool
from plugins.local.source import LocalImageSource, _qemu_nbd_serving
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.faults.harness import Inject, Recorder, chosen_hits, installed, record_case
from tests.helpers import read_disk
from tests.integration.images import make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.integration

CHUNK = 256 * 1024
IO_STEPS = ("mid_write", "before_fsync", "before_rename", "before_dir_fsync")


async def backup(store: Store, image: Path, level: str) -> BackupOutcome:
    pool = make_cpu_pool(store.keys, store.config.chunk_size)
    try:
        return await run_backup(
            store=store,
            pool=pool,
            source=LocalImageSource([image]),
            journal=Journal(store.path / "journal"),
            level=level,
        )
    finally:
        await pool.aclose()


def bitmaps(image: Path) -> list[str]:
    info = json.loads(run("qemu-img", "info", "--output=json", "--force-share", image))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


def new_store(path: Path) -> Store:
    Store.init(path, chunk_size=CHUNK, pack_size=4 * 2**20, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    return Store.open(path, passphrase=PASSPHRASE)


@cache
def recorded() -> dict[str, int]:
    import tempfile

    async def go(d: Path) -> Recorder:
        image = make_fs_qcow2(d, "vm", size_mib=32)
        store = new_store(d / "store")
        try:
            await backup(store, image, "full")
            rec = Recorder()
            with installed(rec):
                await backup(store, image, "incremental")
        finally:
            store.close()
        return rec

    with tempfile.TemporaryDirectory() as d:
        rec = asyncio.run(go(Path(d)))
    return {
        n: c
        for n, c in rec.hits.items()
        if n.startswith("journal.") and n.rsplit(".", 1)[-1] in IO_STEPS
    }


def cases() -> list[tuple[str, int, str]]:
    return [
        (point, nth, kind)
        for point, count in sorted(recorded().items())
        for nth in chosen_hits(count)
        for kind in ("ENOSPC", "EIO")
    ]


@pytest.mark.parametrize(("point", "nth", "kind"), cases(), ids=lambda v: str(v))
async def test_journal_fault(tmp_path: Path, point: str, nth: int, kind: str) -> None:
    image = make_fs_qcow2(tmp_path, "vm", size_mib=32)
    path = tmp_path / "store"
    store = new_store(path)
    committed: list[tuple[str, Path]] = []
    try:
        first = await backup(store, image, "full")
        assert first.manifest is not None
        committed.append((first.manifest.snapshot_id, reference(image, tmp_path / "ref0.raw")))
        qemu_io(image, "write -P 0x5a 2M 3M")
        before = bitmaps(image)
        inject = Inject(point, nth, kind)
        outcome: BackupOutcome | None = None
        with installed(inject):
            try:
                outcome = await backup(store, image, "incremental")
            except EngineError as e:  # the job's first record could not be written
                error = str(e)
            else:
                error = outcome.record.error or ""
        assert inject.fired
        assert not _qemu_nbd_serving(image), "a helper outlived its job"
        ref1 = reference(image, tmp_path / "ref1.raw")
        if outcome is not None and outcome.record.state is State.SUCCEEDED:
            assert outcome.manifest is not None
            committed.append((outcome.manifest.snapshot_id, ref1))
            assert any("journal" in w for w in outcome.record.warnings)
        else:
            assert str(path) in error and kind in error and "journal" in error, error
            assert bitmaps(image) == before, "the failed run's bitmap was left"
        qemu_io(image, "write -P 0x5b 9M 2M")
        after = await backup(store, image, "incremental")  # the same process goes on
        assert after.record.state is State.SUCCEEDED, after.record.error
        assert after.manifest is not None
        committed.append((after.manifest.snapshot_id, reference(image, tmp_path / "ref2.raw")))
        lost = sum(
            read_disk(store, store.manifest(sid)) != ref.read_bytes() for sid, ref in committed
        )
    finally:
        store.close()
    with Store.open(path, passphrase=PASSPHRASE) as reopened:
        assert not reopened.report.problems
        result = verify(reopened, VerifyOptions(data=True, mark=False))
    record_case(
        "journal write faults",
        f"{point}#{nth} {kind}",
        detected=1,
        lost=lost,
        undetected=0 if result.ok else len(result.findings),
        committed=len(committed),
    )
    assert lost == 0
    assert result.ok, result.findings
