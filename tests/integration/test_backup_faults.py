"""Read faults injected with nbdkit filters between the readers and qemu-nbd.

nbdkit's ``nbd`` plugin proxies to the real qemu-nbd export; its ``error`` filter fails
reads with EIO at a given rate, its ``delay`` filter slows them. Transient errors are
retried (on a fresh connection) and the backup is exact; persistent ones fail the job with
the disk and offset named, and nothing is half-committed.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.io.nbd.client import connect
from engine.io.qemu import NbdServerProcess
from engine.jobs.states import State
from engine.maint.check import check_store
from engine.sources.types import BackupSession, ResourceRecorder
from plugins.local.source import LocalImageSource, NbdReader
from tests.conftest import StoreFactory
from tests.helpers import backup_with_retries, read_disk
from tests.integration.images import make_fs_qcow2, reference, run

pytestmark = pytest.mark.integration


class NbdkitProxy(NbdServerProcess):
    def __init__(self, upstream: Path, filters: Sequence[str], params: Sequence[str]):
        super().__init__()
        self._upstream, self._filters, self._params = upstream, filters, params

    def argv(self, socket: Path) -> list[str]:
        filters = [f"--filter={f}" for f in self._filters]
        return [
            "nbdkit",
            "-f",
            "-U",
            str(socket),
            *filters,
            "nbd",
            f"socket={self._upstream}",
            *self._params,
        ]


class FaultySource(LocalImageSource):
    """The local source, with every reader connection going through an nbdkit proxy."""

    def __init__(self, path: Path, filters: Sequence[str], params: Sequence[str]):
        super().__init__([path])
        self._filters, self._params = filters, params
        self.proxies: list[NbdkitProxy] = []

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> BackupSession:
        session = await super().open(
            parent_checkpoint, keep_checkpoints, new_checkpoint, readers, record
        )
        for disk in session.disks:
            proxy = NbdkitProxy(disk._export.address, self._filters, self._params)  # type: ignore[attr-defined]
            await proxy.start()
            self.proxies.append(proxy)

            async def open_reader(p: NbdkitProxy = proxy) -> NbdReader:
                return NbdReader(await connect(p.address))

            disk.open_reader = open_reader  # type: ignore[method-assign]
        inner_close = session.close

        async def close(success: bool) -> None:
            for p in self.proxies:
                await p.stop()
            await inner_close(success)

        session.close = close  # type: ignore[method-assign]
        return session


def bitmaps(image: Path) -> list[str]:
    info = json.loads(run("qemu-img", "info", "--output=json", image))
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]


async def test_transient_read_errors_are_retried(tmp_path: Path, make_store: StoreFactory) -> None:
    store = make_store(chunk_size=256 * 1024, pack_size=8 * 2**20)
    image = make_fs_qcow2(tmp_path, "vm", size_mib=48)
    ref = reference(image, tmp_path / "ref.raw")
    source = FaultySource(
        image, ["error", "delay"], ["error=EIO", "error-pread-rate=30%", "delay-read=1ms"]
    )
    # 30 % of reads fail; 12 attempts make a false failure ~5e-7 per read.
    outcome = await backup_with_retries(store, source, attempts=12)
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert sum(d.retries for d in outcome.disks) > 0
    assert outcome.manifest is not None
    assert read_disk(store, outcome.manifest) == ref.read_bytes()


async def test_persistent_read_errors_fail_with_disk_and_offset(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    store = make_store(chunk_size=256 * 1024, pack_size=8 * 2**20)
    image = make_fs_qcow2(tmp_path, "vm", size_mib=48)
    good = await backup_with_retries(store, LocalImageSource([image]))
    assert good.record.state is State.SUCCEEDED
    before = bitmaps(image)
    source = FaultySource(image, ["error"], ["error=EIO", "error-pread-rate=100%"])
    outcome = await backup_with_retries(store, source, level="full")
    record = outcome.record
    assert record.state is State.FAILED
    assert record.error is not None
    assert f"disk {image}" in record.error and "at offset" in record.error and "EIO" in record.error
    # Nothing half-committed: no new snapshot, the run's bitmap removed, exports stopped.
    assert [s.snapshot_id for s in store.snapshots()] == [good.manifest.snapshot_id]  # type: ignore[union-attr]
    assert bitmaps(image) == before
    assert all(p.pid is None for p in source.proxies)
    assert check_store(store, data=True).ok
    assert not list(store.layout.snapshots.glob("*/*.dmap.tmp"))
    # The next backup succeeds and is incremental from the good one.
    after = await backup_with_retries(store, LocalImageSource([image]), level="incremental")
    assert after.record.state is State.SUCCEEDED
    assert after.level == "incremental"
