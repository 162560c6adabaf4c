"""Backups, from a typed request to typed outcomes: the one path for ``tessera backup`` run in
this process and for the daemon's backup jobs (API, policies).

::

    VmBackupRequest(vms, level, flow, require_quiesce, engine, readers, policy, disks)
        → check()                        ConfigError for an unknown level or flow, at once
        → backup_vms(config, target, request, progress=…, api_gate=…, job_id=…)
              the engine's hypervisor plugin's ``vm_sources`` (one ``VmSet``: one engine
              connection for every VM of the request)
              (``disks``: the disks of each VM it reads; a VM none of whose disks they
              take fails its backup, an outcome, before anything is created)
              → per VM: ``backup_sources`` → ``engine.jobs.backup.run_backup``
        → yields one ``BackupOutcome`` per VM, in order; the client is closed at the end

``progress(vm)`` is entered around each VM's backup and gives the per-disk progress callback
(the terminal's display, or a daemon job's view). A failed backup is an outcome (its record
says FAILED), never an exception; an error before any backup starts (an unknown VM, no
DataMover, a refused quiesce) raises ``ConfigError``.
"""

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from engine.app.requests import VmBackupRequest
from engine.app.stores import JobStore
from engine.jobs.backup import BackupOutcome, Progress, run_backup
from engine.pipeline.defaults import DEFAULT_READERS
from engine.sources import registry
from engine.sources.capabilities import ApiGate
from engine.sources.types import Source

if TYPE_CHECKING:  # a local backup or restore reads no configuration (issue 15)
    from engine.config.models import Config

# Entered around one VM's backup (its name); gives the per-disk progress callback.
ProgressFor = Callable[[str], AbstractContextManager[Progress | None]]


async def backup_sources(
    target: JobStore,
    sources: Sequence[Source],
    *,
    level: str,
    readers: int = DEFAULT_READERS,
    progress: ProgressFor,
    job_id: str | None = None,
    policy: str | None = None,
) -> AsyncIterator[BackupOutcome]:
    """Back up each source into ``target``, one after the other; yield each outcome.
    ``job_id`` (a daemon job's id) applies to a single source only; ``policy`` names the
    policy whose run this is (None: made by hand), on every snapshot."""
    if job_id is not None and len(sources) != 1:
        raise ValueError("a job id names one backup")
    for source in sources:
        with progress(source.vm_name) as show:
            outcome = await run_backup(
                store=target.store,
                pool=target.pool,
                source=source,
                journal=target.journal,
                level=level,
                readers=readers,
                progress=show,
                job_id=job_id,
                policy=policy,
            )
        yield outcome


async def backup_vms(
    config: "Config",
    target: JobStore,
    request: VmBackupRequest,
    *,
    progress: ProgressFor,
    api_gate: ApiGate | None = None,
    job_id: str | None = None,
) -> AsyncIterator[BackupOutcome]:
    """Back up the request's VMs through the plugin's ``vm_sources`` (module docstring)."""
    request.check()
    engine = config.engine(request.engine)
    _, hypervisor = registry.hypervisor(engine)
    found = await hypervisor.vm_sources(
        engine,
        list(request.vms),
        request.flow,
        require_quiesce=request.require_quiesce,
        datamover=config.datamover,
        api_gate=api_gate,
        disks=request.disks,
    )
    try:
        async for outcome in backup_sources(
            target,
            found.sources,
            level=request.level,
            readers=request.readers,
            progress=progress,
            job_id=job_id,
            policy=request.policy,
        ):
            yield outcome
    finally:
        await found.aclose()
