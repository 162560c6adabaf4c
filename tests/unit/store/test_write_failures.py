"""The store after a failed write: the pack is abandoned, sessions that began before the
failure refuse to commit, sessions that began after it commit, and the store stays usable."""

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from engine.core.errors import StoreWriteError
from engine.store.chunk_store import Store
from engine.util import failpoints
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.faults.harness import Inject, installed
from tests.helpers import read_disk, write_snapshot

CHUNK = 64 * 1024


def store_at(path: Path) -> Store:
    Store.init(path, chunk_size=CHUNK, pack_size=1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
    return Store.open(path, passphrase=PASSPHRASE)


def chunk(n: int) -> bytes:
    return n.to_bytes(4, "big") * (CHUNK // 4)


def test_a_failed_append_abandons_the_pack_and_names_store_and_errno(tmp_path: Path) -> None:
    with store_at(tmp_path / "s") as store:
        first = store.put_chunk(chunk(1))
        with (
            installed(Inject("store.record.mid_write", 1, "ENOSPC")),
            pytest.raises(StoreWriteError) as raised,
        ):
            store.put_chunk(chunk(2))
        message = str(raised.value)
        assert str(tmp_path / "s") in message and "ENOSPC" in message and "needed" in message
        # the record that was pending in the abandoned pack no longer deduplicates
        assert not store.has(first)
        again = store.put_chunk(chunk(1))
        store.flush()
        assert again == first and store.read_chunk(first) == chunk(1)
        assert not list((tmp_path / "s" / "packs" / "tmp").iterdir())


def test_sessions_before_a_failure_refuse_to_commit_later_ones_commit(tmp_path: Path) -> None:
    with store_at(tmp_path / "s") as store:
        before = store.begin_snapshot("vm-a", "vm-a", "full")
        dm = before.add_disk("d", "d", CHUNK)
        dm.set(0, store.put_chunk(chunk(7)))  # pending in the pack that will fail
        with (
            installed(Inject("store.pack.before_fsync", 1, "EIO")),
            pytest.raises(StoreWriteError, match="EIO"),
        ):
            store.flush()  # the seal fails: the pack is abandoned
        # a session that begins now is not concerned by the old failure
        after = write_snapshot(store, "vm-b", {"d": chunk(7) + chunk(8)})
        assert read_disk(store, after) == chunk(7) + chunk(8)
        with pytest.raises(StoreWriteError, match="abandoned while it was written"):
            before.commit()
        assert [e.vm_id for e in store.snapshots()] == ["vm-b"]


def test_a_background_seal_failure_does_not_fail_a_later_session(tmp_path: Path) -> None:
    with store_at(tmp_path / "s") as store:
        sealing = threading.Event()

        def fail_seal(name: str) -> None:
            if name == "store.pack.before_fsync" and not sealing.is_set():
                sealing.set()
                raise OSError(errno.EIO, "I/O error")

        failpoints.install(fail_seal)
        try:
            for _ in range(20):  # > 1 MiB of incompressible chunks: a pack rotates, fails
                store.put_chunk(os.urandom(CHUNK))
            assert sealing.wait(10)
            deadline = time.monotonic() + 10
            while store.write_token() == 0:  # the sealer abandons the pack
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            failpoints.install(None)
        # nobody waited for that seal: the next session's flush must not inherit its error
        later = write_snapshot(store, "vm", {"d": chunk(1) + chunk(2)})
        assert read_disk(store, later) == chunk(1) + chunk(2)
