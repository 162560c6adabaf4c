"""The fake engine's one clock: every time-driven behaviour of the lab engine reads it.

The real engine moves its objects in its own threads, whoever polls. The lab does that work
in ``monitor``, which sleeps on this clock between looks; every age it compares (a phase of
a transfer, backup or snapshot, a cold checkpoint delete, a new disk, an SSO token) is a
difference of two ``now()`` readings of the same clock (``Activity.due``; ``sso.Sessions``
for tokens).

- ``SystemClock``: ``time.monotonic`` and ``asyncio.sleep``. The default, and what ``tessera
  lab up`` runs.
- ``FakeClock``: virtual time for tests, as ``engine.sched.clock.FakeClock`` is for the
  scheduler. It stands still until the test calls ``advance``, which wakes sleepers in
  deadline order, setting the time to each deadline, and waits until each woken task sleeps
  on the clock again (or ends) before it moves on. So when ``advance`` returns, the monitor
  has made every look due in the span, each to its end. (The scheduler's clock settles with
  a fixed number of loop iterations instead; a look here awaits real work — qemu-img,
  imageio's control API — that takes longer.) Time is kept in integer nanoseconds, so
  deadlines a test adds up land exactly.

What the clock does not drive: what real programs time themselves. imageio counts a
ticket's ``idle_time`` and expiry on its own (real) clock: the engine's inactivity monitor
*looks* when this clock says, and compares the idle time imageio reports, as the real engine
compares what vdsm reports. qemu's throttle (``Faults.storage_iops``), the delay
``Faults.slow_ms`` adds to an answer a client waits for, and the dates the engine reports
(``records.now``, wall time) are real too.
"""

import asyncio
import heapq
import itertools
import time
from typing import Final, Protocol

# Ages are compared to the microsecond: a difference of two float readings may land a hair
# short of a step that is exactly due (0.35 - 0.1 < 0.25 in binary floating point).
RESOLUTION: Final = 1e-6
# A task FakeClock.advance woke must sleep again (or end) within this many real seconds: a
# monitor look is a few qemu/imageio calls; one that never ends is a bug to report, not wait on.
REST_TIMEOUT: Final = 30.0
# Loop iterations ``advance`` lets ready tasks run first, so a task just started (the
# monitor of an engine just started) reaches its first sleep before time moves.
SETTLE_ROUNDS: Final = 20


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds (any origin; only differences mean something)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock (at once if ≤ 0)."""
        ...


def elapsed(now: float, since: float, seconds: float) -> bool:
    """Whether ``seconds`` have passed from ``since`` to ``now`` (to ``RESOLUTION``)."""
    return now - since >= seconds - RESOLUTION


class SystemClock:
    """Real time: ``time.monotonic`` and ``asyncio.sleep``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def _ns(seconds: float) -> int:
    return round(seconds * 1_000_000_000)


class FakeClock:
    """Virtual time that moves only in ``advance`` (module docstring). Use on one loop."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = _ns(start)
        # (deadline ns, sequence, the sleeper's future, its task); cancelled ones are skipped.
        self._sleepers: list[tuple[int, int, asyncio.Future[None], asyncio.Task[object]]] = []
        self._seq = itertools.count()
        self._woken: dict[asyncio.Task[object], asyncio.Future[None]] = {}

    def now(self) -> float:
        return self._now / 1_000_000_000

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None  # called from a coroutine on the loop
        rested = self._woken.pop(task, None)
        if rested is not None and not rested.done():
            rested.set_result(None)  # ``advance`` may move on
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + _ns(seconds), next(self._seq), future, task))
        await future

    async def advance(self, seconds: float) -> None:
        """Move time ``seconds`` on, waking every sleeper due on the way (module docstring).

        Raises ``ValueError`` for a negative step and ``RuntimeError`` naming a woken task
        that did not sleep again within ``REST_TIMEOUT``."""
        if seconds < 0:
            raise ValueError(f"time cannot go back ({seconds} s)")
        target = self._now + _ns(seconds)
        for _ in range(SETTLE_ROUNDS):
            await asyncio.sleep(0)
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future, task = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._now = max(self._now, when)
            rested = asyncio.get_running_loop().create_future()
            self._woken[task] = rested
            future.set_result(None)
            try:
                async with asyncio.timeout(REST_TIMEOUT):
                    await asyncio.wait([task, rested], return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError:
                raise RuntimeError(
                    f"task {task.get_name()} woken at {self.now()} s did not sleep again "
                    f"within {REST_TIMEOUT} s"
                ) from None
            finally:
                self._woken.pop(task, None)
        self._now = max(self._now, target)
