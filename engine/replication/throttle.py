"""A token bucket shared by every stream of a session: the per-peer bandwidth limit.

``take(n)`` waits until ``n`` bytes may go. Tokens refill at ``rate`` bytes per second up to
``burst`` (default: a tenth of a second's worth, at least 64 KiB, so even a short session
keeps to the limit). Debt is allowed: a record larger than the bucket takes what is there
and waits for the rest, so any record passes and the long-run rate is exact. Clock and sleep are
injected so tests never wait.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

MIN_BURST: Final = 64 * 1024


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if rate <= 0:
            raise ValueError(f"bandwidth limit {rate} must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(MIN_BURST, rate / 10))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = asyncio.Lock()  # callers queue in order: no starvation

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def take(self, n: int) -> None:
        async with self._lock:
            self._refill()
            self._tokens -= n
            if self._tokens < 0:
                await self._sleep(-self._tokens / self.rate)
                self._refill()


class Unlimited:
    async def take(self, n: int) -> None:
        return None


Throttle = TokenBucket | Unlimited
