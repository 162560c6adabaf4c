"""``JobManager``'s listeners: ``on_started`` is awaited before a job's body runs (the
daemon makes the job's history row durable there), and a listener that fails never fails
the job."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from engine.daemon.jobs import JobManager, JobView
from engine.util.limits import Limits


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
