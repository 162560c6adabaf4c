"""``tessera backup vm --disk`` while ``tessera run`` holds the store: the CLI hands the
patterns to the daemon (``POST /v1/backups`` ``disks``), whose job applies them — a pattern
that takes none of the VM's disks fails the job naming the VM, the patterns and its disks;
one that takes its disk backs it up, and the job's parameters say which disks were asked."""

from pathlib import Path

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.e2e.test_daemon import Daemon, lab, tessera, wait_jobs

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with test_daemon


async def test_backup_vm_disk_goes_through_the_daemon(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    engine, config = lab
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await tessera("backup", "vm", "web01", "--config", config, "--disk", "nope*")
        assert code == 1, out
        assert "submitted to the daemon" in out, out
        assert "VM web01: the disk selection (nope*) takes none of its disks (web01_os)" in out
        assert not engine.activity.backups  # refused before anything was created

        code, out = await tessera(
            "backup", "vm", "web01", "--config", config, "--level", "full", "--disk", "web01_*"
        )
        assert code == 0, out
        jobs = await wait_jobs(config, 2)
        assert [(j["state"], j["params"].get("disks")) for j in jobs] == [
            ("failed", ["nope*"]),
            ("succeeded", ["web01_*"]),
        ], jobs
    finally:
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()
