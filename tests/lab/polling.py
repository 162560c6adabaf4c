"""Waiting for the lab engine as a client does, on either of its clocks.

The lab's phases move with time (``plugins.lab.engine.monitor``), not per GET, so a client
waits between two looks. How a test waits depends on whose time it is:

- A test that drives the lab engine itself gives it a ``FakeClock`` and moves that: ``Stepper``
  advances it by phase steps (``advance`` on the loop, ``step`` from the worker thread an SDK
  call blocks in), and ``steps`` is a polling loop that steps between looks. No real time
  passes, and each step moves every object due exactly one phase, so a test can say which
  phase a client sees after how many steps.
- A test that runs product code against a lab on the real clock (the product polls in real
  time, in another process or task) waits in real time: ``polls`` sleeps ``POLL_INTERVAL``
  between looks, a fraction of the lab's phase step.
"""

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ovirtsdk4 as sdk

from plugins.lab.engine import FakeClock, Faults

POLL_INTERVAL = 0.05  # seconds between looks: a fraction of the lab's phase step
POLL_LIMIT = 30.0  # seconds: far beyond any lab phase; a stuck phase fails the test
STEP_LIMIT = 12  # phase steps: more than any lab sequence takes; a stuck phase fails the test
STEP_TIMEOUT = 60.0  # real seconds one step may take (the engine's looks run qemu, imageio)


def polls(limit: float = POLL_LIMIT, interval: float = POLL_INTERVAL) -> Iterator[int]:
    """Yield 0, 1, 2… sleeping ``interval`` between yields, for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    n = 0
    while True:
        yield n
        if time.monotonic() > deadline:
            return
        time.sleep(interval)
        n += 1


@dataclass
class Stepper:
    """Moves a lab engine's ``FakeClock`` by its phase steps (``Faults.phase_seconds``).

    A phase step that is a whole number of the monitor's ``TICK`` (the default 0.25 s is
    five) lands on one of its looks, so each step moves every object due exactly one phase."""

    clock: FakeClock
    faults: Faults
    loop: asyncio.AbstractEventLoop

    async def advance(self, steps: float = 1) -> None:
        """Move the clock ``steps`` phase steps on; returns once the engine did the work due."""
        await self.clock.advance(steps * self.faults.phase_seconds)

    def step(self, steps: float = 1) -> None:
        """``advance`` from a worker thread (not the loop's), waiting for it to end."""
        future = asyncio.run_coroutine_threadsafe(self.advance(steps), self.loop)
        future.result(timeout=STEP_TIMEOUT)


class Client(sdk.Connection):
    """An SDK connection to a lab whose clock its user moves: ``step`` (``Stepper.step``)."""

    def __init__(self, step: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step


def steps(conn: Client, limit: int = STEP_LIMIT) -> Iterator[int]:
    """Yield 0, 1, 2…, moving the lab's clock one phase step between yields, at most
    ``limit`` steps."""
    n = 0
    while True:
        yield n
        if n >= limit:
            return
        conn.step()
        n += 1
