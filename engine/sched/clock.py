"""Time, injected: the scheduler asks a ``Clock`` for the time and to sleep, so tests drive
virtual time with ``FakeClock`` and never sleep for real."""

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol

# A real sleep re-reads the wall clock at least this often, so a clock step (NTP, a resumed
# suspend) delays a due run by at most this much.
MAX_REAL_SLEEP = 60.0
# FakeClock.advance lets woken tasks run this many loop iterations before moving on: enough
# for a scheduler wake-up plus a job start, with no real I/O involved.
SETTLE_ROUNDS = 50


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware (UTC)."""
        ...

    async def sleep_until(self, when: datetime) -> None:
        """Return at or after ``when`` (at once if it has passed)."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime) -> None:
        while (left := (when - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, MAX_REAL_SLEEP))


class FakeClock:
    """Virtual time. ``await advance(delta)`` wakes sleepers in deadline order, setting the
    time to each deadline and letting the woken tasks run before the next."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware start time")
        self._now = start.astimezone(UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    async def sleep_until(self, when: datetime) -> None:
        if when <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when.astimezone(UTC), next(self._seq), future))
        await future  # a cancelled sleeper's future is skipped when popped

    async def advance(self, delta: timedelta) -> None:
        await self.advance_to(self._now + delta)

    async def advance_to(self, target: datetime) -> None:
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not future.done():
                future.set_result(None)
                await settle()
        self._now = max(self._now, target.astimezone(UTC))
        await settle()

    def jump(self, delta: timedelta) -> None:
        """Move time without waking anyone (a daemon that was not running)."""
        self._now += delta

    @property
    def next_wakeup(self) -> datetime | None:
        live = [when for when, _, future in self._sleepers if not future.done()]
        return min(live, default=None)


async def settle() -> None:
    """Let ready tasks run (a fixed number of loop iterations)."""
    for _ in range(SETTLE_ROUNDS):
        await asyncio.sleep(0)
