"""``JobManager``'s listeners: ``on_started`` is awaited before a job's body runs (the
daemon makes the job's history row durable there), and a listener that fails never fails
the job; ``job.finished`` goes out at the severity of the job's outcome."""

import asyncio
import io
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog

from engine.config.models import SyslogSection
from engine.daemon.jobs import JobManager, JobView
from engine.obs import log
from engine.obs.syslog import SD_ID
from engine.util.limits import Limits
from tests.unit.obs.rfc5424 import parse


@asynccontextmanager
async def running(manager: JobManager) -> AsyncIterator[JobManager]:
    task = asyncio.create_task(manager.run())
    await asyncio.sleep(0)
    try:
        yield manager
    finally:
        manager.close()
        await task


async def test_on_started_is_awaited_before_the_body() -> None:
    order: list[str] = []
    gate = asyncio.Event()

    async def started(view: JobView) -> None:
        order.append(f"started {view.state} {view.started is not None}")
        await gate.wait()  # e.g. a history write in a thread
        order.append("started done")

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        order.append("body")
        return "succeeded", {}

    async with running(JobManager(Limits({"vms": 1}), on_started=started)) as manager:
        view = manager.submit("gc", "store:main", body)
        while not order:
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0)
        assert order == ["started running True"]  # the body waits for the listener
        gate.set()
        assert view.task is not None
        await view.task
    assert order == ["started running True", "started done", "body"]
    assert view.state == "succeeded"


async def test_a_failing_on_started_does_not_fail_the_job() -> None:
    async def started(view: JobView) -> None:
        raise OSError("history.db: disk full")

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        return "succeeded", {"ok": True}

    async with running(JobManager(Limits({"vms": 1}), on_started=started)) as manager:
        view = manager.submit("verify", "store:main", body)
        assert view.task is not None
        await view.task
    assert (view.state, view.summary, view.error) == ("succeeded", {"ok": True}, None)


async def test_job_finished_reaches_syslog_at_the_severity_of_its_outcome() -> None:
    """Through a real UDP syslog socket on loopback: a failed job is ``err`` (3), one that
    succeeded with warnings ``warning`` (4), a clean one ``info`` (6) — issue 16: a failed
    job reached syslog at warning/info, never err."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    section = SyslogSection(host="127.0.0.1", port=receiver.getsockname()[1], protocol="udp")
    saved = structlog.get_config()
    forwarder = log.configure(level=logging.INFO, json=True, stream=io.StringIO(), syslog=section)
    assert forwarder is not None

    def body(state: str, warn: bool) -> Any:
        async def run(view: JobView) -> tuple[str, dict[str, Any]]:
            if warn:
                view.note("warning", "disk data: bitmap missing, read in full")
            if state == "raise":
                raise OSError("connection reset")
            return state, {"bytes_read": 1024}

        return run

    try:
        async with running(JobManager(Limits({"vms": 3}))) as manager:
            views = {
                vm: manager.submit("backup", vm, body(state, warn))
                for vm, state, warn in [
                    ("vm-failed", "raise", False),
                    ("vm-warned", "succeeded", True),
                    ("vm-clean", "succeeded", False),
                ]
            }
            await asyncio.wait([v.task for v in views.values() if v.task is not None])
        assert forwarder.flush()
        severities: dict[str, int] = {}
        while len(severities) < 3:
            m = parse(receiver.recv(65536))
            if m.msgid == "job.finished":
                severities[m.sd[SD_ID]["vm"]] = m.severity
                if m.sd[SD_ID]["vm"] == "vm-warned":
                    assert json.loads(m.sd[SD_ID]["warnings"]) == [
                        "disk data: bitmap missing, read in full"
                    ]
                    assert json.loads(m.sd[SD_ID]["summary"]) == {"bytes_read": 1024}
    finally:
        log.configure()  # closes the forwarder
        structlog.configure(**saved)
        receiver.close()
    assert severities == {"vm-failed": 3, "vm-warned": 4, "vm-clean": 6}


async def test_open_ended_jobs_take_no_vm_slot_and_a_drain_cancels_them() -> None:
    """Two exports of one snapshot run at once beside a job holding the only ``vms`` unit;
    a drain does not wait for them: it cancels them and is idle once the others ended."""
    serving = asyncio.Event()
    release = asyncio.Event()

    async def serve(view: JobView) -> tuple[str, dict[str, Any]]:
        serving.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("not reached")

    async def backup(view: JobView) -> tuple[str, dict[str, Any]]:
        await release.wait()
        return "succeeded", {}

    async with running(JobManager(Limits({"vms": 1}))) as manager:
        held = manager.submit("backup", "web01", backup)
        first = manager.submit("export", "snapshot:ab12", serve, open_ended=True)
        second = manager.submit("export", "snapshot:ab12", serve, open_ended=True)
        await serving.wait()
        assert {first.state, second.state} == {"running"}
        assert manager.busy_job("snapshot:ab12") is None
        drained = asyncio.create_task(manager.drain(grace=60))
        assert first.task is not None and second.task is not None
        await asyncio.wait([first.task, second.task])
        assert (first.state, second.state) == ("cancelled", "cancelled")
        assert not drained.done()  # the backup still runs
        release.set()
        assert await drained
        assert held.state == "succeeded"
