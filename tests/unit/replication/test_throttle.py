"""The token bucket on a fake clock: the long-run rate is the limit, bursts are bounded."""

from engine.replication.throttle import TokenBucket


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_rate_is_kept_over_many_takes() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000.0, burst=100.0, clock=t.clock, sleep=t.sleep)
    for _ in range(50):
        await bucket.take(200)
    # 10,000 bytes at 1,000 B/s, less the 100-byte initial burst.
    assert abs(t.now - 9.9) < 1e-9


async def test_a_record_larger_than_the_bucket_passes_and_pays_later() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000.0, burst=100.0, clock=t.clock, sleep=t.sleep)
    await bucket.take(5000)
    assert abs(t.now - 4.9) < 1e-9
    await bucket.take(1)
    assert abs(t.now - 4.901) < 1e-9


async def test_idle_time_refills_only_up_to_the_burst() -> None:
    t = FakeTime()
    bucket = TokenBucket(1000.0, clock=t.clock, sleep=t.sleep)  # burst: 64 KiB minimum
    t.now = 3600.0
    await bucket.take(64 * 1024)
    assert t.slept == []
    await bucket.take(1000)
    assert abs(t.slept[-1] - 1.0) < 1e-9
