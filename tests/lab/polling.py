"""Polling as an engine client does it (SDK-EX ``backup_vm.py`` sleeps between GETs): the lab's
phases move with time (``plugins.lab.engine.monitor``), not per GET, so a test's polling loop
must wait between looks. For SDK calls made in a worker thread."""

import time
from collections.abc import Iterator

POLL_INTERVAL = 0.05  # seconds between looks: a fraction of the lab's phase step
POLL_LIMIT = 30.0  # seconds: far beyond any lab phase; a stuck phase fails the test


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
