"""`tessera run` end to end: the daemon in a subprocess against the lab (fake engine + real
ovirt-imageio + qemu-nbd), driven through its API by the operator CLI.

A policy run by hand backs up its VM; `tessera backup vm` goes through the running daemon;
a restore through the daemon creates a new VM; a SIGTERM during a backup stops the daemon
cleanly (the job is cancelled and cleaned up, nothing left on the engine); a SIGKILL during
a backup leaves a journal that the next start cleans up, the job shows in the history as
interrupted, and the next run succeeds.
"""

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.core.units import MiB
from engine.jobs.history import INTERRUPTED
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from tests.integration.test_smtp import Mailbox, smtp_server
from tests.integration.test_syslog import StreamReceiver
from tests.lab_disks import build_once
from tests.ovirt.test_faults import assert_clean
from tests.unit.obs.rfc5424 import Parsed, parse

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TESSERA_PASSPHRASE": "daemon-test"}
SEED = Seed(
    vms=(
        VmSeed(name="web01", disks=(DiskSeed("web01_os", 256 * MiB, bootable=True),)),
        VmSeed(name="db01", disks=(DiskSeed("db01_os", 256 * MiB, bootable=True),)),
    )
)
POLICY = """\
name: nightly
selection:
  vms: [web*]
schedule: daily 02:00
level: {default: incremental, full_every: 7d}
notifications: {on: [success, failure], to: [ops@example.org]}
retention: {keep_last: 1}
"""


async def tessera(*args: str | Path, timeout: float = 300) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli.main",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=ENV,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


class Daemon:
    """`tessera run` as a subprocess, its stdout (JSON log lines) in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None):
        self.config, self.log = config, log
        self.env = ENV if env is None else env
        self.proc: asyncio.subprocess.Process | None = None

    async def start(
        self,
        *args: str,
        kill_at: tuple[str, int] | None = None,
        pause_at: tuple[str, Path] | None = None,
    ) -> None:
        """Start ``tessera run`` and wait for its ``READY=1`` on a notify socket, as systemd
        does (``Type=notify``); fails at once if it exits first. ``kill_at`` (failpoint, N):
        the daemon SIGKILLs itself at the N-th hit (``tests.integration.kill_backup``);
        ``pause_at`` (failpoint, directory): it holds at the first hit until the test lets it
        go (``tests.integration.pause_at``)."""
        name = f"tessera-test-{uuid.uuid4().hex}"
        module = ["engine.cli.main"]
        if kill_at is not None:
            module = ["tests.integration.kill_backup", kill_at[0], str(kill_at[1]), "--"]
        if pause_at is not None:
            module = ["tests.integration.pause_at", pause_at[0], str(pause_at[1]), "--"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind("\0" + name)
            notify.setblocking(False)
            with self.log.open("ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    *module,
                    "run",
                    "--config",
                    str(self.config),
                    *args,
                    cwd=ROOT,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self.env | {"NOTIFY_SOCKET": "@" + name},
                )
            exited = asyncio.create_task(self.proc.wait())
            try:
                async with asyncio.timeout(120):  # a loaded machine opens stores slowly
                    while not exited.done():
                        message = asyncio.create_task(
                            asyncio.get_running_loop().sock_recv(notify, 4096)
                        )
                        try:
                            await asyncio.wait(
                                (message, exited), return_when=asyncio.FIRST_COMPLETED
                            )
                            if message.done() and b"READY=1" in message.result().split(b"\n"):
                                return
                        finally:
                            message.cancel()
            except TimeoutError:
                pass
            finally:
                exited.cancel()
        raise AssertionError(f"the daemon did not start:\n{self.log.read_text()}")

    def events(self, name: str) -> list[dict[str, Any]]:
        docs = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                docs.append(json.loads(line))
        return docs

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 120)

    async def kill(self) -> None:
        """Test teardown: whatever happened, no daemon outlives the test."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def lab(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[FakeEngine, Path]]:
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(SEED, engine_dir)
    disks = {d.alias: d for d in probe.inventory.disks.values()}
    images = {alias: tmp_path / f"{alias}.qcow2" for alias in disks}
    await build_once(
        tmp_path_factory,
        [
            DiskRequest(
                alias,
                path,
                "qcow2",
                disks[alias].provisioned_size,
                template=True,
                vm=alias.split("_")[0],
            )
            for alias, path in images.items()
        ],
    )
    async with ImageioDaemon(base_dir=tmp_path) as imageio:
        engine = FakeEngine(
            SEED, engine_dir, images={disks[a].id: p for a, p in images.items()}, imageio=imageio
        )
        async with engine:
            (tmp_path / "engine-password").write_text(SEED.password + "\n")
            (tmp_path / "policies.d").mkdir()
            (tmp_path / "policies.d" / "nightly.yaml").write_text(POLICY)
            config = tmp_path / "config.yaml"
            config.write_text(
                "stores:\n"
                f"  - name: main\n    path: {tmp_path / 'store'}\n"
                "engines:\n"
                f"  - name: lab\n    url: {engine.url}\n    username: {SEED.username}\n"
                f"    password_file: {tmp_path / 'engine-password'}\n"
                f"    ca_file: {engine.ca_file}\n"
                f"api:\n  socket: {tmp_path / 'api.sock'}\n"
                f"scheduler:\n  state_file: {tmp_path / 'scheduler.json'}\n"
            )
            code, out = await tessera("store", "init", tmp_path / "store")
            assert code == 0, out
            yield engine, config


async def wait_jobs(config: Path, count: int) -> list[dict[str, Any]]:
    """The daemon's jobs once ``count`` of them have ended."""
    for _ in range(600):
        code, out = await tessera("jobs", "--config", config, "--json")
        assert code == 0, out
        jobs: list[dict[str, Any]] = json.loads(out)
        if sum(j["finished"] is not None for j in jobs) >= count:
            return jobs
        await asyncio.sleep(0.2)
    raise AssertionError(f"jobs did not end: {out}")


def add_config(config: Path, text: str) -> None:
    config.write_text(config.read_text() + text)


async def get_text(socket_path: Path, path: str) -> str:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://tessera{path}") as response:
            assert response.status == 200
            return await response.text()


def syslog_lines(sock: socket.socket) -> list[Parsed]:
    lines = []
    with contextlib.suppress(BlockingIOError):
        while True:
            lines.append(parse(sock.recv(65536)))
    return lines


async def test_policy_cli_backup_and_restore_through_the_daemon(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    engine, config = lab
    mailbox = Mailbox()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    async with smtp_server(mailbox) as smtp_port:
        add_config(
            config,
            f"syslog:\n  host: 127.0.0.1\n  port: {udp.getsockname()[1]}\n  protocol: udp\n"
            f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
            "  from: tessera@dm01.example.org\n",
        )
        try:
            await through_the_daemon(tmp_path, engine, config, mailbox, udp)
        finally:
            udp.close()


async def through_the_daemon(
    tmp_path: Path, engine: FakeEngine, config: Path, mailbox: Mailbox, udp: socket.socket
) -> None:
    daemon = Daemon(config, tmp_path / "daemon.log")
    await daemon.start()
    try:
        code, out = await tessera("policies", "--config", config, "--json")
        assert code == 0, out
        (policy,) = json.loads(out)
        assert policy["name"] == "nightly" and policy["next_run"] is not None

        code, out = await tessera("policies", "--config", config, "--run", "nightly")
        assert code == 0, out
        (job,) = await wait_jobs(config, 1)
        assert (job["vm"], job["policy"], job["state"]) == ("web01", "nightly", "succeeded")
        assert job["params"]["level"] == "full"  # no full yet: the level rules say full

        # the policy's e-mail, the metrics and the syslog lines say so
        for _ in range(100):
            if mailbox.envelopes:
                break
            await asyncio.sleep(0.1)
        (envelope,) = mailbox.envelopes
        assert envelope.rcpt_tos == ["ops@example.org"]
        message = mailbox.message()  # the run's digest
        assert message["Subject"] == "[tessera] policy nightly: web01 succeeded"
        assert message["X-Tessera-Policy"] == "nightly"
        assert f"  web01: {job['id']}" in message.get_payload()
        text = await get_text(tmp_path / "api.sock", "/metrics")
        assert 'tessera_jobs_finished_total{kind="backup",state="succeeded"} 1.0' in text
        assert 'tessera_last_success_timestamp_seconds{vm="web01"}' in text
        lines = syslog_lines(udp)
        finished = [m for m in lines if m.msgid == "job.finished"]
        assert finished, [m.msgid for m in lines]
        assert finished[0].app == "tessera"
        assert finished[0].severity == 6  # succeeded without warnings: info
        assert next(iter(finished[0].sd.values()))["job"] == job["id"]

        # `backup vm` finds the daemon on the config's socket and follows the job there
        code, out = await tessera("backup", "vm", "db01", "--config", config, "--level", "full")
        assert code == 0, out
        assert "submitted to the daemon" in out and "succeeded" in out

        # the policy again: an incremental of web01, then its retention keeps only that one
        code, out = await tessera("policies", "--config", config, "--run", "nightly")
        assert code == 0, out
        jobs = await wait_jobs(config, 3)
        assert jobs[-1]["state"] == "succeeded" and jobs[-1]["params"]["level"] == "incremental"
        for _ in range(100):
            if len(daemon.events("retention.applied")) == 2:  # after each run
                break
            await asyncio.sleep(0.1)
        first, second = daemon.events("retention.applied")
        assert first["removed"] == []  # one snapshot: nothing to remove
        assert second["vm"] == "web01" and len(second["removed"]) == 1

        status = json.loads(await get_text(tmp_path / "api.sock", "/v1/status"))
        limits = {lim["name"]: lim for lim in status["limits"]}
        assert limits["vms"]["acquired"] == 3 and limits["vms"]["in_use"] == 0
        assert any(name.startswith("transfers/sd/") for name in limits), limits
        assert limits["api/lab"]["acquired"] > 10 and limits["api/lab"]["peak"] <= 8

        code, out = await tessera("job", job["id"], "--config", config, "--json")
        assert code == 0, out
        detail = json.loads(out)
        assert any("started" in line for line in detail["log"])
        assert detail["summary"]["snapshot"]

        code, out = await tessera("snapshots", "--config", config, "--json")
        assert code == 0, out
        snaps = {s["vm"]["name"]: s for s in json.loads(out)}
        assert set(snaps) == {"web01", "db01"}

        code, out = await tessera(
            "restore", snaps["db01"]["id"], "--config", config, "--name", "db01-copy"
        )
        assert code == 0, out
        names = {vm.name for vm in engine.inventory.vms.values()}
        assert "db01-copy" in names
        await assert_clean(engine, SEED)

        # maintenance while the daemon holds the store: `tessera gc --config` is a daemon job
        code, out = await tessera("gc", "--config", config)
        assert code == 0, out
        assert "submitted to the daemon" in out and "gc succeeded" in out, out
    finally:
        code = await daemon.stop()
        await daemon.kill()
        assert code == 0, daemon.log.read_text()
    assert daemon.events("daemon.stopped")
    assert not (tmp_path / "api.sock").exists()


async def test_sigterm_during_a_backup_stops_cleanly_and_kill_is_recovered(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    engine, config = lab
    receiver = StreamReceiver()  # syslog over TCP this time
    add_config(config, f"syslog:\n  host: 127.0.0.1\n  port: {receiver.port}\n  protocol: tcp\n")
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        await sigterm_then_kill(engine, config, daemon)
    finally:
        await daemon.kill()
        receiver.stop()
    events = []
    with contextlib.suppress(queue.Empty):
        while True:
            events.append(parse(receiver.messages.get_nowait()).msgid)
    assert {"daemon.ready", "daemon.stopping", "job.finished", "job.recovered"} <= set(events)


async def sigterm_then_kill(engine: FakeEngine, config: Path, daemon: Daemon) -> None:
    engine.faults.storage_iops = 4  # slow disks: the backup is still running when we signal
    await daemon.start("--grace", "0")
    code, out = await tessera("policies", "--config", config, "--run", "nightly")
    assert code == 0, out
    await until_transferring(config)
    assert await daemon.stop(signal.SIGTERM) == 0, daemon.log.read_text()
    (finished,) = daemon.events("job.finished")
    assert finished["state"] == "cancelled"
    await assert_clean(engine, SEED)  # the job's own cleanup ran before the exit

    # A SIGKILL leaves the job in the journal; the next start cleans up what it created.
    await daemon.start()
    code, out = await tessera("policies", "--config", config, "--run", "nightly")
    assert code == 0, out
    await until_transferring(config)
    assert await daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    engine.faults.storage_iops = 0
    await daemon.start()
    assert daemon.events("job.recovered"), daemon.log.read_text()
    await assert_clean(engine, SEED)
    code, out = await tessera("policies", "--config", config, "--run", "nightly")
    assert code == 0, out
    # The first daemon's cancelled job is in the job history, the killed one as interrupted,
    # with what the journal's recovery undid (same job id).
    jobs = await wait_jobs(config, 3)
    assert [j["state"] for j in jobs] == ["cancelled", "failed", "succeeded"], jobs
    killed = jobs[1]
    assert killed["error"].startswith(INTERRUPTED), killed
    facts = killed["summary"]["interrupted"]
    assert facts["was"] == "transferring" and facts["recovery"], facts
    assert killed["started"] <= killed["finished"] <= facts["found_at_restart"], killed
    (event,) = daemon.events("job.interrupted")
    assert event["job"] == killed["id"]
    assert await daemon.stop() == 0


async def until_transferring(config: Path) -> None:
    """Wait until the running job has read some bytes (it is mid-transfer), asking the
    daemon's API directly (a CLI process per poll is too slow to catch a short backup)."""
    socket_path = config.parent / "api.sock"
    for _ in range(1200):
        if socket_path.exists():
            jobs = json.loads(await get_text(socket_path, "/v1/jobs?running=1"))
            if any(d["done"] > 0 for j in jobs for d in j["disks"].values()):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("no job started transferring")


async def test_a_schedule_fires_by_itself(tmp_path: Path, lab: tuple[FakeEngine, Path]) -> None:
    """No "run now": the policy's calendar (every 3 s) starts the backup; the scheduler then
    shows the next run, and runs of the policy never overlap."""
    _, config = lab
    (tmp_path / "policies.d" / "nightly.yaml").write_text(
        POLICY.replace("schedule: daily 02:00", 'schedule: "*:*:0/3"')
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        await daemon.start()
        (job,) = (await wait_jobs(config, 1))[:1]
        assert (job["vm"], job["policy"], job["state"]) == ("web01", "nightly", "succeeded")
        fired = [e for e in daemon.events("schedule.event") if e["outcome"] == "started"]
        assert fired and fired[0]["reason"] != "started by hand"
        code, out = await tessera("policies", "--config", config, "--json")
        assert code == 0, out
        (policy,) = json.loads(out)
        assert policy["next_run"] is not None
        code = await daemon.stop()
    finally:
        await daemon.kill()
    assert code == 0
    jobs_by_vm = [e for e in daemon.events("job.started") if e["vm"] == "web01"]
    finished = daemon.events("job.finished")
    # never two backups of web01 at once: every start follows the previous one's end
    starts = [e["timestamp"] for e in jobs_by_vm]
    ends = [e["timestamp"] for e in finished]
    assert all(s >= e for s, e in zip(starts[1:], ends, strict=False))


async def test_sighup_reloads_policies_while_a_backup_runs(
    tmp_path: Path, lab: tuple[FakeEngine, Path]
) -> None:
    """`systemctl reload tessera` (SIGHUP): a changed policy and a new one are in effect at
    once while a backup runs, and that backup goes on to succeed; a reload that would change
    the stores is refused as a whole and the daemon keeps its configuration."""
    engine, config = lab
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        engine.faults.storage_iops = 20  # slow disks: the backup runs through the reload
        await daemon.start()
        code, out = await tessera("policies", "--config", config, "--run", "nightly")
        assert code == 0, out
        await until_transferring(config)
        (tmp_path / "policies.d" / "nightly.yaml").write_text(
            POLICY.replace("daily 02:00", "daily 03:30")
        )
        (tmp_path / "policies.d" / "weekly.yaml").write_text(
            POLICY.replace("name: nightly", "name: weekly").replace("daily 02:00", "sun 05:00")
        )
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if daemon.events("daemon.reloaded"):
                break
            await asyncio.sleep(0.1)
        (reloaded,) = daemon.events("daemon.reloaded")
        assert (reloaded["added"], reloaded["changed"], reloaded["running"]) == (
            ["weekly"],
            ["nightly"],
            1,
        )
        code, out = await tessera("policies", "--config", config, "--json")
        assert code == 0, out
        policies = {p["name"]: p for p in json.loads(out)}
        assert set(policies) == {"nightly", "weekly"}
        (schedule,) = policies["nightly"]["schedule"]
        assert "03:30" in schedule and "02:00" not in schedule, schedule
        assert policies["nightly"]["running"]  # the run that was going when the reload came

        # A changed store section needs a restart: refused, nothing changes.
        text = config.read_text()
        config.write_text(text.replace("name: main", "name: other"))
        daemon.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if daemon.events("daemon.reload_failed"):
                break
            await asyncio.sleep(0.1)
        (failed,) = daemon.events("daemon.reload_failed")
        assert "stores" in failed["error"]
        config.write_text(text)

        engine.faults.storage_iops = 0
        (job,) = await wait_jobs(config, 1)
        assert (job["policy"], job["state"]) == ("nightly", "succeeded"), job
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
