"""The driver persists each state before acting, and maps errors/cancellation to cleanup."""

import asyncio
import errno
import os
from pathlib import Path

import pytest

from engine.core.errors import SourceError, StoreWriteError
from engine.jobs.driver import JobDriver
from engine.jobs.journal import Journal
from engine.jobs.states import Event, State


async def make(tmp_path: Path) -> tuple[Journal, JobDriver]:
    journal = Journal(tmp_path / "journal")
    record = await journal.create("backup", "local", {"vm": "x"})
    return journal, JobDriver(journal, record)


async def test_success_path_persists_before_each_step(tmp_path: Path) -> None:
    journal, driver = await make(tmp_path)
    seen: list[State] = []

    def step(event: Event):  # type: ignore[no-untyped-def]
        async def run() -> Event:
            seen.append(journal.load(driver.record.job_id).state)  # on disk already
            return event

        return run

    cleaned: list[bool] = []

    async def cleanup(success: bool) -> None:
        seen.append(journal.load(driver.record.job_id).state)
        cleaned.append(success)

    record = await driver.run(
        {
            State.PREPARING: step(Event.PREPARED),
            State.TRANSFERRING: step(Event.TRANSFERRED),
            State.COMMITTING: step(Event.COMMITTED),
        },
        cleanup,
    )
    assert seen == [State.PREPARING, State.TRANSFERRING, State.COMMITTING, State.FINISHING]
    assert cleaned == [True]
    assert record.state is State.SUCCEEDED
    assert journal.load(record.job_id).state is State.SUCCEEDED
    assert journal.unfinished() == []


async def test_error_runs_cleanup_and_fails_with_the_message(tmp_path: Path) -> None:
    _journal, driver = await make(tmp_path)
    cleaned: list[bool] = []

    async def boom() -> Event:
        raise SourceError(disk="d1", offset=4096, reason="EIO")

    async def cleanup(success: bool) -> None:
        cleaned.append(success)

    record = await driver.run(
        {State.PREPARING: lambda: asyncio.sleep(0, Event.PREPARED), State.TRANSFERRING: boom},
        cleanup,
    )
    assert record.state is State.FAILED
    assert record.error == "disk d1 at offset 4096: EIO"
    assert cleaned == [False]
    assert [h.split()[1] for h in record.history] == [
        "preparing",
        "transferring",
        "aborting",
        "failed",
    ]


async def test_cancellation_cleans_up_then_reraises(tmp_path: Path) -> None:
    journal, driver = await make(tmp_path)
    started = asyncio.Event()
    cleaned: list[bool] = []

    async def forever() -> Event:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cleanup(success: bool) -> None:
        cleaned.append(success)

    task = asyncio.create_task(driver.run({State.PREPARING: forever}, cleanup))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [False]
    assert journal.load(driver.record.job_id).state is State.CANCELLED


async def test_cleanup_failure_after_commit_is_a_warning(tmp_path: Path) -> None:
    _journal, driver = await make(tmp_path)

    async def bad_cleanup(success: bool) -> None:
        raise OSError("qemu-nbd would not stop")

    record = await driver.run(
        {
            State.PREPARING: lambda: asyncio.sleep(0, Event.PREPARED),
            State.TRANSFERRING: lambda: asyncio.sleep(0, Event.TRANSFERRED),
            State.COMMITTING: lambda: asyncio.sleep(0, Event.COMMITTED),
        },
        bad_cleanup,
    )
    assert record.state is State.SUCCEEDED
    assert record.warnings == ["cleanup: OSError: qemu-nbd would not stop"]


async def test_journal_round_trip_and_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    record = await journal.create("restore", "local", {"snapshot": "abc"})
    record.resources["target"] = "/tmp/x.qcow2"
    await journal.save(record)
    loaded = journal.load(record.job_id)
    assert loaded.resources == {"target": "/tmp/x.qcow2"}
    assert loaded.state is State.PENDING
    monkeypatch.setattr("engine.jobs.journal.KEEP_FINISHED", 1)
    for _ in range(3):
        r = await journal.create("backup", "local", {})
        r.state = State.SUCCEEDED
        await journal.save(r)
    journal.prune()
    assert len([r for r in journal.records() if r.finished]) == 1
    # unfinished: for recovery, the records of dead owners only; this process lives
    assert journal.unfinished() == []
    other = Journal(tmp_path)  # another process's view (its own open file, its own lock)
    assert other.alive(record) and other.unfinished() == []
    journal.release_owner()  # as if this process died
    assert [r.job_id for r in other.unfinished()] == [record.job_id]
    other.prune()  # the dead owner's lock file goes
    assert list((tmp_path / "owners").iterdir()) == []


@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EIO])
async def test_an_owner_lock_that_cannot_be_made_names_its_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """A full disk or an I/O error while the owner lock is made: the job is refused with
    the file named, no record and no half-made lock file are left, and the next try works."""
    journal = Journal(tmp_path)
    real_rename = os.rename

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr("engine.jobs.journal.os.rename", failing_rename)
    with pytest.raises(StoreWriteError, match="job journal owner lock"):
        await journal.create("restore", "local", {})
    assert list(tmp_path.glob("*.json")) == []
    assert list((tmp_path / "owners").iterdir()) == []
    monkeypatch.setattr("engine.jobs.journal.os.rename", real_rename)
    record = await journal.create("restore", "local", {})
    assert Journal(tmp_path).alive(record)
