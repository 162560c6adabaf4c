"""Retrying transient failures — the one place retry loops live.

``retry(fn, what=...)`` calls ``fn`` until it succeeds, an error that is not retryable is
raised (``IntegrityError`` and friends are never retried), or the attempts are spent; then
the last error propagates unchanged, so its identity (disk, offset…) reaches the caller.
Delays grow exponentially with full jitter; the sleep function is injected so tests never
wait.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from engine.core.errors import EngineError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # 1 try + 3 retries: rides out a restarting server, not an outage
    base_delay: float = 0.05  # seconds; doubled per attempt
    max_delay: float = 2.0


DEFAULT_POLICY = RetryPolicy()


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, EngineError):
        return error.retryable
    return isinstance(error, ConnectionError | TimeoutError)


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    on_retry: Callable[[int, BaseException], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except Exception as e:
            if attempt == policy.attempts or not is_retryable(e):
                raise
            if on_retry is not None:
                on_retry(attempt, e)
            delay = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
            await sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not crypto
    raise AssertionError("unreachable")
