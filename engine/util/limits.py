"""Named limits: weighted async semaphores with statistics (DESIGN §5).

Every bound the daemon enforces — VMs at once, image transfers per host and per storage
domain, engine API calls — is a ``Limit`` with a name (``transfers/host/<id>``) that the API
and the metrics show: capacity, units in use, waiters, the peak, and time spent waiting.

A job that needs several limits takes them through ``Limits.hold``, which acquires them in
name order: two jobs can never each hold what the other waits for. A weighted request larger
than the capacity is cut to the capacity (a VM with more disks than a host may serve still
runs, alone on that host), so no request can wait forever.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Limit:
    name: str
    capacity: int
    in_use: int = 0
    waiting: int = 0
    peak: int = 0
    acquired: int = 0  # acquisitions so far
    waited_seconds: float = 0.0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"limit {self.name}: capacity must be ≥ 1, not {self.capacity}")

    @asynccontextmanager
    async def hold(self, units: int = 1) -> AsyncIterator[int]:
        """Hold ``units`` (cut to the capacity) until the block ends; yields the units held."""
        units = max(1, min(units, self.capacity))
        started = time.monotonic()
        async with self._changed:
            self.waiting += 1
            try:
                await self._changed.wait_for(lambda: self.in_use + units <= self.capacity)
            finally:
                self.waiting -= 1
            self.in_use += units
        self.acquired += 1
        self.peak = max(self.peak, self.in_use)
        self.waited_seconds += time.monotonic() - started
        try:
            yield units
        finally:
            async with self._changed:
                self.in_use -= units
                self._changed.notify_all()

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capacity": self.capacity,
            "in_use": self.in_use,
            "waiting": self.waiting,
            "peak": self.peak,
            "acquired": self.acquired,
            "waited_seconds": round(self.waited_seconds, 3),
        }


class Limits:
    """The registry: ``get("transfers/host/h1")`` makes the limit on first use with the
    capacity of its family (the part before the last ``/``) from ``capacities``."""

    def __init__(self, capacities: Mapping[str, int]):
        self._capacities = dict(capacities)
        self._limits: dict[str, Limit] = {}

    def get(self, name: str) -> Limit:
        limit = self._limits.get(name)
        if limit is None:
            family = name.rsplit("/", 1)[0] if "/" in name else name
            if family not in self._capacities:
                raise KeyError(f"no capacity configured for limit family {family!r}")
            limit = self._limits[name] = Limit(name, self._capacities[family])
        return limit

    @asynccontextmanager
    async def hold(self, needs: Mapping[str, int]) -> AsyncIterator[None]:
        """Hold every ``name → units`` of ``needs``, acquired in name order."""
        async with AsyncExitStack() as stack:
            for name in sorted(needs):
                await stack.enter_async_context(self.get(name).hold(needs[name]))
            yield

    def stats(self) -> list[dict[str, Any]]:
        return [self._limits[n].stats() for n in sorted(self._limits)]
