"""Waiting for the engine, on an injected clock.

Every engine object the plugin creates moves through phases on the engine's own time (a
transfer ``initializing`` → ``transferring``, a snapshot ``locked`` → ``ok``, a backup
``starting`` → ``ready``); a client learns where it is only by reading it again. Each such
wait in the plugin is the same loop, written out where it is used because what ends it
differs::

    wait = Wait(client.clock, READY_TIMEOUT)
    while (phase := await read()) != wanted:
        if phase is an end: raise, naming the object and the phase
        if wait.expired:    raise, "still <phase>"
        await wait.pause()

``Clock`` is the time source those loops read: ``LoopClock`` (the event loop's monotonic
clock and ``asyncio.sleep``) in production, a test's own clock that jumps forward on
``sleep`` to run a 30-minute timeout in no time. ``EngineClient.clock`` carries it, so every
wait on one engine uses the client's clock.
"""

import asyncio
from typing import Final, Protocol

POLL_INTERVAL: Final = 0.25  # seconds between reads: engine phases move in seconds


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class LoopClock:
    """The running event loop's clock."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


LOOP_CLOCK: Final = LoopClock()


class Wait:
    """One wait of at most ``timeout`` seconds on ``clock``, from now."""

    def __init__(self, clock: Clock, timeout: float, interval: float = POLL_INTERVAL) -> None:
        self.clock = clock
        self.timeout = timeout
        self.interval = interval
        self._deadline = clock.monotonic() + timeout

    @property
    def expired(self) -> bool:
        return self.clock.monotonic() > self._deadline

    async def pause(self) -> None:
        """Sleep one poll interval before the next read."""
        await self.clock.sleep(self.interval)
