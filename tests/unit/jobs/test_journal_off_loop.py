"""The journal's writes run off the event loop, in order, and a state is durable before the
driver acts on it.

Each test holds a journal write inside its fsync (the ``journal.before_fsync`` failpoint, hit
on the writer thread just before ``os.fsync``) until a coroutine *on the event loop* lets it
go. Had the write run on the loop thread, that coroutine could never run: the write would
wait for it forever. The wait is bounded only so that such a deadlock fails the test with a
message instead of hanging it; nothing here measures time.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.jobs.driver import JobDriver
from engine.jobs.journal import Journal
from engine.jobs.states import Event, State
from engine.util import failpoints

DEADLOCK = 60.0  # seconds a held write waits for the loop before it gives up (a failure)


@dataclass
class HeldFsync:
    """A failpoint handler that, once ``arm()``ed, holds journal fsyncs until the event loop
    releases them: ``reached`` (an asyncio.Event, set through the loop) says a write is
    held; ``release()`` (called from a coroutine on the loop) lets it and later ones go."""

    loop: asyncio.AbstractEventLoop
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    threads: list[str] = field(default_factory=list)
    armed: bool = False
    _go: threading.Event = field(default_factory=threading.Event)

    def arm(self) -> None:
        self.reached.clear()
        self._go.clear()
        self.armed = True

    def release(self) -> None:
        self._go.set()

    def __call__(self, name: str) -> None:
        if name != "journal.before_fsync" or not self.armed:
            return
        self.threads.append(threading.current_thread().name)
        self.loop.call_soon_threadsafe(self.reached.set)
        if not self._go.wait(DEADLOCK):
            raise AssertionError("the event loop did not run while a journal write was held")


@pytest.fixture
async def held() -> AsyncIterator[HeldFsync]:
    handler = HeldFsync(asyncio.get_running_loop())
    failpoints.install(handler)
    try:
        yield handler
    finally:
        handler.release()
        failpoints.install(None)


async def test_a_save_waits_for_its_fsync_off_the_loop(tmp_path: Path, held: HeldFsync) -> None:
    journal = Journal(tmp_path)
    record = await journal.create("backup", "local", {})
    held.arm()

    record.resources["export"] = {"dir": "/run/x"}
    save = asyncio.create_task(journal.save(record))
    await held.reached.wait()  # runs only if the loop is free while the fsync is held
    assert not save.done()  # the save returns once the record is durable, not before
    held.release()
    await save
    assert journal.load(record.job_id).resources == {"export": {"dir": "/run/x"}}
    assert held.threads and all(t.startswith("journal-writer") for t in held.threads)


async def test_saves_are_written_in_the_order_asked(tmp_path: Path, held: HeldFsync) -> None:
    """Two saves of one record, the first held in its fsync: the second waits its turn and
    the file ends with the newer state, though both were asked for before either ran."""
    journal = Journal(tmp_path)
    record = await journal.create("backup", "local", {})
    held.arm()

    record.state = State.PREPARING
    first = asyncio.create_task(journal.save(record))
    await held.reached.wait()
    record.state = State.TRANSFERRING
    second = asyncio.create_task(journal.save(record))
    await asyncio.sleep(0)
    assert journal.load(record.job_id).state is State.PENDING  # neither is done yet
    held.release()
    await asyncio.gather(first, second)
    assert journal.load(record.job_id).state is State.TRANSFERRING


async def test_a_cancelled_saver_still_gets_its_record_written(
    tmp_path: Path, held: HeldFsync
) -> None:
    journal = Journal(tmp_path)
    record = await journal.create("backup", "local", {})
    held.arm()

    record.resources["snapshot"] = "s1"
    save = asyncio.create_task(journal.save(record))
    await held.reached.wait()
    save.cancel()
    with pytest.raises(asyncio.CancelledError):
        await save
    held.release()
    record.resources["transfers"] = ["t1"]
    await journal.save(record)  # after the cancelled one, in order
    assert journal.load(record.job_id).resources == {"snapshot": "s1", "transfers": ["t1"]}


async def test_the_driver_acts_on_a_state_only_once_it_is_durable(
    tmp_path: Path, held: HeldFsync
) -> None:
    """The save of PREPARING is held: the step must not start meanwhile (the loop runs other
    coroutines, this test's among them), and starts once the record on disk says PREPARING."""
    journal = Journal(tmp_path)
    record = await journal.create("backup", "local", {})
    held.arm()
    driver = JobDriver(journal, record)
    seen: list[State] = []

    async def prepare() -> Event:
        seen.append(journal.load(record.job_id).state)
        return Event.PREPARED

    async def transfer() -> Event:
        return Event.TRANSFERRED

    async def commit() -> Event:
        return Event.COMMITTED

    async def cleanup(success: bool) -> None:
        return None

    steps = {State.PREPARING: prepare, State.TRANSFERRING: transfer, State.COMMITTING: commit}
    job = asyncio.create_task(driver.run(steps, cleanup))
    await held.reached.wait()
    assert seen == []  # PREPARING is not durable yet: its step has not run
    held.release()
    assert (await job).state is State.SUCCEEDED
    assert seen == [State.PREPARING]


async def test_a_cancel_during_a_transition_save_cancels_the_job_cleanly(
    tmp_path: Path, held: HeldFsync
) -> None:
    """Cancelled while PREPARING is being saved: the save completes, the step never runs,
    the job cleans up and ends CANCELLED on disk, and the cancellation reaches the caller."""
    journal = Journal(tmp_path)
    record = await journal.create("backup", "local", {})
    held.arm()
    driver = JobDriver(journal, record)
    ran: list[str] = []

    async def prepare() -> Event:
        ran.append("prepare")
        return Event.PREPARED

    async def cleanup(success: bool) -> None:
        ran.append(f"cleanup success={success}")

    job = asyncio.create_task(driver.run({State.PREPARING: prepare}, cleanup))
    await held.reached.wait()
    job.cancel()
    await asyncio.sleep(0)
    assert not job.done()  # it waits for the save it must not act without
    held.release()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert ran == ["cleanup success=False"]
    on_disk = journal.load(record.job_id)
    assert on_disk.state is State.CANCELLED
    assert [h.split()[1] for h in on_disk.history] == ["preparing", "cancelling", "cancelled"]
