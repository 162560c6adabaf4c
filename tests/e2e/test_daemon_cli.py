"""The operator's commands while `tessera run` holds the store (issue 16, point 5): the daemon
in a subprocess against the lab, the CLI as a user types it.

- `gc --config` with `--dry-run`, `--grace` runs as a daemon job with those options (the
  rest from the daemon's configuration), and a dry run changes nothing;
- `cancel` of a job that has ended fails (exit 1) naming its state;
- Ctrl-C on a client following a job stops the following, not the job: the client says the
  job keeps running and exits 130; the job succeeds in the daemon.
"""

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.e2e.test_daemon import ENV, ROOT, Daemon, lab, tessera, wait_jobs

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with test_daemon


def packs(store: Path) -> set[str]:
    return {p.name for p in (store / "packs").rglob("*") if p.is_file()}


async def test_gc_with_its_options_runs_in_the_daemon(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    _, config = lab
    store = tmp_path / "store"
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        for _ in range(2):
            code, out = await tessera(
                "backup", "vm", "web01", "--config", config, "--level", "full"
            )
            assert code == 0, out
        # prune works on the store beside the daemon (no writer lock): one snapshot removed
        code, out = await tessera("prune", "--store", store, "--keep-last", "1")
        assert code == 0 and "removed 1 snapshots" in out, out
        before = packs(store)

        code, out = await tessera("gc", "--config", config, "--dry-run", "--grace", "0")
        assert code == 0, out
        assert "submitted to the daemon" in out and "gc succeeded" in out, out
        assert "would delete 1 removed snapshots past grace" in out, out
        assert packs(store) == before  # a dry run changes nothing
        removed = await tessera("snapshots", "removed", "--store", store, "--json")
        assert len(json.loads(removed[1])) == 1, removed

        # the daemon's configured grace (7 days) keeps the removed snapshot ...
        code, out = await tessera("gc", "--config", config)
        assert code == 0 and "gc succeeded" in out, out
        assert "delete 1 removed snapshots" not in out, out
        # ... a grace given here does not
        code, out = await tessera("gc", "--config", config, "--grace", "0")
        assert code == 0 and "delete 1 removed snapshots past grace" in out, out
        removed = await tessera("snapshots", "removed", "--store", store, "--json")
        assert json.loads(removed[1]) == [], removed
        jobs = await wait_jobs(config, 5)
        gcs = [j for j in jobs if j["kind"] == "gc"]
        assert [j["params"].get("dry_run", False) for j in gcs] == [True, False, False], gcs
    finally:
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()


async def test_cancel_of_an_ended_job_fails_and_names_its_state(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    _, config = lab
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await tessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code == 0, out
        (job,) = await wait_jobs(config, 1)
        code, out = await tessera("cancel", job["id"], "--config", config)
        assert code == 1, out
        assert f"job {job['id']} already ended (succeeded): nothing to cancel" in out, out
        code, out = await tessera("cancel", "20260101T000000-000000", "--config", config)
        assert code == 2 and "no job '20260101T000000-000000'" in out, out  # a wrong argument
    finally:
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()


async def test_ctrl_c_stops_following_and_the_job_runs_on(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    _, config = lab
    hold = tmp_path / "hold"
    hold.mkdir()
    daemon = Daemon(config, tmp_path / "daemon.log")
    # the daemon holds at the first slot backed up: the job is surely running when Ctrl-C comes
    await daemon.start(pause_at=("pipeline.slot.done", hold))
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.cli.main",
            *("backup", "vm", "web01", "--config", str(config), "--level", "full"),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=ENV,
        )
        for _ in range(1200):
            if (hold / "paused").exists() or client.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert (hold / "paused").exists(), "the job never reached its first slot"
        await asyncio.sleep(0.5)  # the client is following by now (it polls every 0.5 s)
        client.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(client.communicate(), 60)
        text = out.decode() + err.decode()
        assert client.returncode == 130, text
        (line,) = [x for x in err.decode().splitlines() if "stopped following" in x]
        job_id = line.split("job ")[1].split()[0]
        assert line == (
            f"tessera: stopped following; job {job_id} keeps running in the daemon "
            "(`tessera cancel JOB_ID` with the same --config or --socket stops one)"
        ), text
        (hold / "resume").touch()
        (job,) = await wait_jobs(config, 1)
        assert (job["id"], job["state"]) == (job_id, "succeeded"), job
    finally:
        (hold / "resume").touch()
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()
