"""Finish or clean up the jobs a killed process left unfinished (read from the journal).

Runs when a process opens the store for jobs, before any new job, on the records whose owner
process is dead (``Journal.alive``; one recovery at a time, ``Journal.lock_recovery``). A
process with a read-only store (a restore beside the daemon) recovers only the jobs that
need no store writes: everything but backups, which wait for the next writer (their
cleanup drops checkpoints and bitmaps, and the writer lock proves no backup of theirs still
runs). A backup whose manifest exists was committed: it is finished
(SUCCEEDED, its source's old checkpoints dropped). Anything else is cleaned up through its
plugin (exports stopped, the new checkpoint removed, a partial restore target deleted) and
marked FAILED; the store's own recovery has already discarded uncommitted data.

Each record it ends gets ``summary["recovered"]``: the state it was in (``was``), its last
save by the dead process (``last_saved``), that process (``pid``) and what was done
(``actions``) — the daemon's job history reads it (``history.interrupted_row``).
"""

import asyncio

from engine.jobs.driver import JobDriver, describe
from engine.jobs.journal import Journal
from engine.jobs.states import CLEANUP, Event, State
from engine.sources import registry
from engine.store.chunk_store import Store


async def recover_unfinished(store: Store, journal: Journal) -> list[str]:
    """Returns one line per action, for the operator. The journal's reads and its pruning
    run in a thread and its saves on its writer thread, never on the event loop."""
    held = await asyncio.to_thread(journal.lock_recovery)
    try:
        return await _recover(store, journal)
    finally:
        journal.unlock_recovery(held)


async def _recover(store: Store, journal: Journal) -> list[str]:
    lines = []
    for record in await asyncio.to_thread(journal.unfinished):
        if record.kind == "backup" and not store.writable:
            continue  # the next writer's (module docstring)
        driver = JobDriver(journal, record)
        was = record.state
        recovered: dict[str, object] = {
            "was": was.value,
            "last_saved": record.updated,
            "pid": record.pid,
            "actions": [],
        }
        record.summary["recovered"] = recovered
        sid = record.resources.get("snapshot_id")
        committed = (
            record.kind == "backup"
            and bool(sid)
            and await asyncio.to_thread(store.layout.manifest(str(sid)).exists)
        )
        if was is State.PENDING:
            recovered["actions"] = ["never started: marked cancelled"]
            await driver.transition(Event.CANCEL)
            lines.append(f"job {record.job_id}: never started; marked cancelled")
            continue
        if was not in CLEANUP:
            record.error = (
                record.error or f"interrupted: process {record.pid} died while {was.value}"
            )
            if committed and was is State.COMMITTING:
                await driver.transition(Event.COMMITTED)
            else:
                await driver.transition(Event.ERROR)
        try:
            actions = await registry.get(record.source).recover(record.resources, committed)
            event = Event.CLEANED
        except Exception as e:  # noqa: BLE001 - one job's failed cleanup must not stop others
            actions = [f"cleanup failed: {describe(e)}"]
            record.warnings.append(actions[0])
            event = Event.ERROR
        recovered["actions"] = actions
        await driver.transition(event)
        lines += [f"job {record.job_id} ({record.kind}, was {was.value}): {a}" for a in actions]
        lines.append(f"job {record.job_id}: now {record.state.value}")
    await asyncio.to_thread(journal.prune)
    lines += journal.damaged
    return lines
