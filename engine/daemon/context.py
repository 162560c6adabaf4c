"""What the daemon's runs need from it, and nothing more: ``DaemonContext``.

Maintenance tasks (``maintenance``) and the links to other sites (``sites``) take this small
context, not the ``Service``: the configuration and policies, the stores opened for jobs, the
job manager and the clock. ``Service`` provides it (mypy checks that at the end of
``service.py``); a test can hand these modules any object that does.
"""

from typing import Protocol

from engine.app.stores import JobStore
from engine.config.models import Config
from engine.config.policy import Policy
from engine.daemon.jobs import JobManager
from engine.sched.clock import Clock


class DaemonContext(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def policies(self) -> tuple[Policy, ...]: ...

    @property
    def stores(self) -> dict[str, JobStore]: ...

    @property
    def jobs(self) -> JobManager: ...

    @property
    def clock(self) -> Clock: ...

    def store(self, name: str | None = None) -> JobStore:
        """The configuration's store ``name`` (None: the only one)."""
        ...
