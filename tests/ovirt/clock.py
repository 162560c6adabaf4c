"""A ``polling.Clock`` for tests: ``sleep`` moves time forward at once, so a wait with a
timeout of minutes runs in no real time and ends exactly as it would on the engine's clock."""

import asyncio


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0  # total seconds the code under test asked to sleep

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        await asyncio.sleep(0)  # still a suspension point, as a real sleep is
