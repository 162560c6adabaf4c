"""Opening a store, one way for the command line and the daemon.

``open_store`` reads the store's configuration, resolves the passphrase of an encrypted
store (``passphrase``: file, environment, prompt when ``interactive``) and opens it; opening
for writing recovers what a killed writer left (``Store.report``). ``open_for_jobs`` adds
what running jobs needs: the journal, with the jobs a killed process left unfinished finished
or cleaned up first (``engine.jobs.recovery``), and a CPU pool for the store's keys.
"""

import asyncio
from dataclasses import dataclass
from pathlib import Path

from engine.app.passphrase import resolve_passphrase
from engine.jobs.journal import Journal
from engine.jobs.recovery import recover_unfinished
from engine.store.chunk_store import Store
from engine.store.layout import ENCRYPTION_NONE, StoreConfig
from engine.workers import CpuPool, make_cpu_pool


def open_store(
    path: Path,
    *,
    passphrase_file: Path | None,
    key_file: Path | None,
    writable: bool,
    interactive: bool | None = None,
) -> Store:
    """Open the store at ``path`` (blocking: call it in a thread from the event loop)."""
    config = StoreConfig.load(path)
    passphrase = None
    if config.encryption != ENCRYPTION_NONE:
        passphrase = resolve_passphrase(passphrase_file, interactive=interactive)
    return Store.open(path, passphrase=passphrase, key_file=key_file, writable=writable)


@dataclass
class JobStore:
    """A store opened for jobs: the store, its job journal and a CPU pool for its keys.
    ``name`` is the configuration's store name (the path for a store named on the command
    line)."""

    name: str
    store: Store
    pool: CpuPool
    journal: Journal

    async def aclose(self) -> None:
        """Close the pool, then the store (the caller owns the store when it passed one)."""
        await self.pool.aclose()
        self.store.close()


async def open_for_jobs(
    name: str, store: Store, *, cpu_tasks: int | None = None
) -> tuple[JobStore, list[str]]:
    """``store`` made ready for jobs; returns it with what recovering the unfinished jobs of
    its journal did (lines for the log or the terminal)."""
    journal = Journal(store.path / "journal")
    recovered = await recover_unfinished(store, journal)
    pool = make_cpu_pool(
        store.keys, store.config.chunk_size, capacity=cpu_tasks, level=store.config.zstd_level
    )
    return JobStore(name, store, pool, journal), recovered


async def open_for_jobs_at(
    name: str,
    path: Path,
    *,
    passphrase_file: Path | None,
    key_file: Path | None,
    cpu_tasks: int | None = None,
) -> tuple[JobStore, list[str]]:
    """``open_store`` for writing (in a thread, never prompting), then ``open_for_jobs``."""
    store = await asyncio.to_thread(
        open_store,
        path,
        passphrase_file=passphrase_file,
        key_file=key_file,
        writable=True,
        interactive=False,
    )
    try:
        return await open_for_jobs(name, store, cpu_tasks=cpu_tasks)
    except BaseException:
        store.close()
        raise
