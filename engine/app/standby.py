"""Cold-standby refreshes, from a typed request to a typed outcome: the one path for
``tessera standby refresh`` and for the daemon's ``standby`` jobs (after each replica a
peer commits here).

::

    StandbyRequest(vm, standby, snapshot, engine)
        → refresh(config, target, request, progress=…, job_id=…)
              the configuration's engine section; ``engine.standby.job.refresh_standby``
              (the engine's hypervisor plugin's ``standby_refresh``: full run or changed
              slots only)
        → ``StandbyOutcome`` (``ok`` False: the job failed, its error in the record)

``target`` is a store opened for jobs (``engine.app.stores.open_for_jobs``): the refresh
journals what it creates on the engine, so a killed run is cleaned up by the next opening.
"""

from dataclasses import dataclass

from engine.app.stores import JobStore
from engine.config.models import Config
from engine.config.policy import Standby
from engine.jobs.restore import Progress
from engine.standby.job import StandbyOutcome, refresh_standby


@dataclass(frozen=True, slots=True)
class StandbyRequest:
    """Bring the standby of ``vm`` (name or id in the store) to ``snapshot`` (id or prefix;
    None: the VM's newest) as ``standby`` says, on the configuration's engine ``engine``
    (None: the only one)."""

    vm: str
    standby: Standby
    snapshot: str | None = None
    engine: str | None = None


async def refresh(
    config: Config,
    target: JobStore,
    request: StandbyRequest,
    *,
    progress: Progress | None = None,
    job_id: str | None = None,
) -> StandbyOutcome:
    """Run ``request``; raises before any job starts for an unknown engine, VM or snapshot
    and for what the plugin's check refuses (e.g. the standby VM runs)."""
    return await refresh_standby(
        target.store,
        target.pool,
        target.journal,
        config.engine(request.engine),
        request.vm,
        request.standby,
        request.snapshot,
        job_id=job_id,
        progress=progress,
    )
