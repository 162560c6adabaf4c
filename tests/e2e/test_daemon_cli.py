"""The operator's commands while `tessera run` holds the store (issue 16, point 5): the daemon
in a subprocess against the lab, the CLI as a user types it.

- `gc --config` with `--dry-run`, `--grace` runs as a daemon job with those options (the
  rest from the daemon's configuration), and a dry run changes nothing; `gc --store` says
  the daemon holds the store and how to go through it;
- restores run beside the daemon on a read-only store (local images, `--direct` into the
  engine); one killed mid-way is cleaned up by the next, one still running by nobody else;
- `standby refresh` runs as a daemon job;
- `cancel` of a job that has ended fails (exit 1) naming its state;
- Ctrl-C on a client following a job stops the following, not the job: the client says the
  job keeps running and exits 130; the job succeeds in the daemon.
"""

import asyncio
import contextlib
import json
import signal
import socket
import sys
from pathlib import Path

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.e2e.test_daemon import ENV, ROOT, Daemon, lab, tessera, wait_jobs

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with test_daemon


def packs(store: Path) -> set[str]:
    return {p.name for p in (store / "packs").rglob("*") if p.is_file()}


def _interruptible() -> None:
    """In the child, before exec: Ctrl-C as at a terminal. An xdist worker ignores SIGINT
    (execnet leaves Ctrl-C to the controller), and an ignored signal stays ignored across
    exec, so ``tessera`` started from it would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def cli(*args: str | Path, wrapper: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    """``tessera ARGS`` started (through a failpoint ``wrapper`` module), output piped."""
    module = [*wrapper, "--"] if wrapper else ["engine.cli.main"]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *module,
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=ENV,
        preexec_fn=_interruptible,
    )


class Hold:
    """The test's side of ``tests.integration.pause_at`` (its docstring): ``directory`` with
    the test's datagram socket, bound before the held process starts."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(directory / "test.sock"))
        self.sock.setblocking(False)

    async def paused(self, why: str) -> None:
        """Until the held process says it holds at its point (AssertionError ``why`` after
        two minutes)."""
        try:
            async with asyncio.timeout(120):
                message = await asyncio.get_running_loop().sock_recv(self.sock, 16)
        except TimeoutError:
            raise AssertionError(why) from None
        assert message == b"paused", message

    def resume(self) -> None:
        """Let it go on (nothing to do if it never held, or has gone on)."""
        with contextlib.suppress(OSError):
            self.sock.sendto(b"go", str(self.directory / "held.sock"))

    def close(self) -> None:
        self.resume()
        self.sock.close()


async def same_image(a: Path, b: Path) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "compare", "-q", str(a), str(b), stdout=asyncio.subprocess.DEVNULL
    )
    return await proc.wait() == 0


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

        # on the store itself: refused, with the way through the daemon
        code, out = await tessera("gc", "--store", store, "--dry-run")
        assert code == 1, out
        assert "the Tessera daemon (pid " in out, out
        assert f"`tessera run --config {config}`) holds it; give --config {config} instead" in out

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
    hold = Hold(tmp_path / "hold")
    daemon = Daemon(config, tmp_path / "daemon.log")
    # The daemon holds its event loop at the first slot backed up: the job is surely running
    # when Ctrl-C comes, and the daemon does not answer meanwhile (the client waits in a
    # progress poll: Ctrl-C must end that wait too).
    await daemon.start(pause_at=("pipeline.slot.done", hold.directory))
    try:
        client = await cli("backup", "vm", "web01", "--config", config, "--level", "full")
        await hold.paused("the job never reached its first slot")
        # The client prints the job's id once the daemon took it; from there on it follows
        # (its next await is in the follow loop), so Ctrl-C finds it following.
        assert client.stdout is not None
        first = await asyncio.wait_for(client.stdout.readline(), 120)
        assert first.endswith(b" submitted to the daemon\n"), first
        client.send_signal(signal.SIGINT)
        try:
            out_bytes, _ = await asyncio.wait_for(client.communicate(), 60)
        except TimeoutError:
            client.kill()
            out_bytes, _ = await client.communicate()
            raise AssertionError(f"the client ignored Ctrl-C:\n{out_bytes.decode()}") from None
        text = first.decode() + out_bytes.decode()
        assert client.returncode == 130, text
        (line,) = [x for x in text.splitlines() if "stopped following" in x]
        job_id = line.split("job ")[1].split()[0]
        assert line == (
            f"tessera: stopped following; job {job_id} keeps running in the daemon "
            "(`tessera cancel JOB_ID` with the same --config or --socket stops one)"
        ), text
        hold.resume()
        (job,) = await wait_jobs(config, 1)
        assert (job["id"], job["state"]) == (job_id, "succeeded"), job
    finally:
        hold.close()
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()


async def test_restores_run_beside_the_daemon_and_a_killed_one_is_cleaned_up_by_the_next(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    engine, config = lab
    store = tmp_path / "store"
    source = tmp_path / "db01_os.qcow2"  # the lab VM's disk (the VM is down: it stays as is)
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await tessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code == 0, out
        code, out = await tessera("snapshots", "--store", store, "--json")
        snap = json.loads(out)[0]["id"]

        # a local restore and a restore into the engine, here, while the daemon holds the store
        code, out = await tessera("restore", snap, "--store", store, "--to", tmp_path / "a.qcow2")
        assert code == 0, out
        assert await same_image(source, tmp_path / "a.qcow2")
        code, out = await tessera(
            "restore", snap, "--config", config, "--name", "db01-here", "--direct"
        )
        assert code == 0 and "restored VM db01-here" in out, out
        assert "db01-here" in {vm.name for vm in engine.inventory.vms.values()}

        # a restore killed mid-way: the next one, beside the same daemon, cleans up after it
        killed = await cli(
            *("restore", snap, "--store", store, "--to", tmp_path / "b.qcow2"),
            wrapper=("tests.integration.kill_backup", "restore.chunk.written", "3"),
        )
        await killed.communicate()
        assert killed.returncode == -signal.SIGKILL
        partial = tmp_path / "b.qcow2.tessera-partial"
        assert partial.exists()
        code, out = await tessera("restore", snap, "--store", store, "--to", tmp_path / "c.qcow2")
        assert code == 0, out
        assert "(restore, was transferring): removed partial image" in out, out
        assert not partial.exists() and not (tmp_path / "b.qcow2").exists(), out

        # a restore that is running is its own process's: neither another restore nor a
        # daemon restart recovers it
        hold = Hold(tmp_path / "hold")
        held = await cli(
            *("restore", snap, "--store", store, "--to", tmp_path / "d.qcow2"),
            wrapper=("tests.integration.pause_at", "restore.chunk.written", str(hold.directory)),
        )
        await hold.paused("the restore never wrote a chunk")
        code, out = await tessera("restore", snap, "--store", store, "--to", tmp_path / "e.qcow2")
        assert code == 0 and "recovery:" not in out, out
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.start()
        assert not daemon.events("job.recovered"), daemon.log.read_text()
        hold.close()
        out_bytes, _ = await asyncio.wait_for(held.communicate(), 120)
        assert held.returncode == 0, out_bytes.decode()
        assert await same_image(source, tmp_path / "d.qcow2")
    finally:
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()


async def test_standby_refresh_runs_in_the_daemon(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    engine, config = lab
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await tessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code == 0, out
        refresh = ("standby", "refresh", "db01", "--config", config, "--cluster", "Default")
        code, out = await tessera(*refresh)
        assert code == 0, out
        assert "submitted to the daemon" in out and "standby db01" in out, out
        assert "db01-standby" in {vm.name for vm in engine.inventory.vms.values()}
        code, out = await tessera(*refresh)  # nothing changed since: nothing to do
        assert code == 0, out
        jobs = await wait_jobs(config, 3)
        standby = [j for j in jobs if j["kind"] == "standby"]
        assert [(j["vm"], j["state"]) for j in standby] == [("standby:db01", "succeeded")] * 2
        code, out = await tessera("standby", "refresh", "web01", *refresh[3:])
        assert code == 2, out  # refused before any job: nothing of web01 is in the store
        assert "no snapshots of VM 'web01' in store main" in out, out
    finally:
        assert await daemon.stop() == 0, daemon.log.read_text()
        await daemon.kill()
