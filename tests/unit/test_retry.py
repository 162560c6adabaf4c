"""The retry helper: transient errors retried, others raised at once; no real sleeping."""

import pytest

from engine.core.errors import CorruptRecord, TransientError
from engine.util.retry import RetryPolicy, retry


async def test_transient_errors_are_retried_then_succeed() -> None:
    calls, sleeps = [], []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError(message="EIO")
        return "ok"

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    assert await retry(flaky, sleep=fake_sleep) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


async def test_attempts_are_bounded_and_last_error_propagates() -> None:
    async def always() -> None:
        raise ConnectionResetError("reset")

    async def no_sleep(_: float) -> None:
        return None

    with pytest.raises(ConnectionResetError):
        await retry(always, policy=RetryPolicy(attempts=3), sleep=no_sleep)


async def test_integrity_errors_are_never_retried() -> None:
    calls = []

    async def corrupt() -> None:
        calls.append(1)
        raise CorruptRecord(chunk="ab", pack="p", offset=0, reason="CRC32 mismatch")

    with pytest.raises(CorruptRecord):
        await retry(corrupt)
    assert calls == [1]
