"""``tessera gc`` from the command line: dry run, the real run, JSON, refusals."""

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.maint.check import check_store
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from tests.cli import Cli
from tests.conftest import CHEAP_KDF, PASSPHRASE

pytestmark = pytest.mark.integration

CLI = Cli(passphrase=PASSPHRASE.decode())
tessera = CLI.run

CHUNK = 64 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    rng = random.Random(7)
    data = [rng.randbytes(CHUNK) for _ in range(32)]
    with Store.open(path, passphrase=PASSPHRASE) as s:
        t0 = datetime(2026, 11, 1, tzinfo=UTC)
        for n, chunks in enumerate((data, data[::4])):
            with s.begin_snapshot("vm", "vm", "full", time=t0 + timedelta(days=n)) as snap:
                dm = snap.add_disk("d", "d", len(chunks) * CHUNK)
                for slot, c in enumerate(chunks):
                    dm.set(slot, s.put_chunk(c))
                snap.commit()
        prune(s, Rules(keep_last=1))
    return path


def test_gc_dry_run_then_run(store: Path) -> None:
    dry = tessera("gc", "--store", store, "--grace", "0h", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] and len(doc["removed_expired"]) == 1 and doc["deleted_chunks"] == 0
    assert doc["packs_repacked"] + doc["packs_trashed"] > 0

    run = tessera("gc", "--store", store, "--grace", "0h", "--rate-limit", "500MiB")
    assert run.returncode == 0, run.stderr
    assert "deleted 24 chunks" in run.stdout and "to the trash" in run.stdout
    with Store.open(store, passphrase=PASSPHRASE, writable=False) as s:
        assert s.index.stats().chunks == 8
        assert check_store(s, data=True).ok
        assert s.layout.trash_files() == {}  # grace 0: retired and emptied in one run
    again = json.loads(tessera("gc", "--store", store, "--json").stdout)
    assert again["deleted_chunks"] == 0 and again["packs_repacked"] == 0


def test_gc_refuses_bad_options_and_a_locked_store(store: Path) -> None:
    bad = tessera("gc", "--store", store, "--grace", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    bad = tessera("gc", "--store", store, "--repack-threshold", "2")
    assert bad.returncode == 2 and "threshold" in bad.stderr
    with Store.open(store, passphrase=PASSPHRASE):  # a backup holds the writer lock
        locked = tessera("gc", "--store", store)
    assert locked.returncode == 1 and "opened for writing by another process" in locked.stderr
