"""``engine.util.inbox.Inbox``: thread results reach the event loop, none lost, on both loops.

The stress test is the one that matters: threads finishing thousands of tasks in bursts while
the loop drains must never leave a waiter unwoken (a lost wakeup hangs a backup; the first
version of the drain, which cleared its flag before reading the pipe, lost one within a few
thousand completions and this test caught it).
"""

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import uvloop

from engine.util.inbox import Inbox

LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    return LOOPS[request.param]


def test_many_threads_many_results_none_lost(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        inbox = Inbox()
        with ThreadPoolExecutor(4) as threads:
            for burst in range(40):
                # Tasks that leave the GIL for 0-50 µs, as the codec does, so that threads
                # finish while the loop reads the pipe (the window of a lost wakeup).
                waiters = [
                    inbox.wrap(threads.submit(_square_after, i, (i * 7 + burst) % 50 * 1e-6))
                    for i in range(250)
                ]
                async with asyncio.timeout(20):  # a lost wakeup would hang here
                    results = await asyncio.gather(*waiters)
                assert results == [i * i for i in range(250)]
        inbox.close()

    run(main())


def _square_after(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i * i


def test_an_error_in_the_thread_is_raised_in_the_loop(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    def fail() -> None:
        raise ValueError("broken in the thread")

    async def main() -> None:
        inbox = Inbox()
        with ThreadPoolExecutor(1) as threads:
            with pytest.raises(ValueError, match="broken in the thread"):
                await inbox.wrap(threads.submit(fail))
        inbox.close()

    run(main())


def test_cancelling_the_waiter_cancels_a_task_not_yet_started(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        inbox = Inbox()
        release = threading.Event()
        with ThreadPoolExecutor(1) as threads:
            blocker = inbox.wrap(threads.submit(release.wait, 10))
            queued: Future[int] = threads.submit(pow, 3, 2)
            waiter = inbox.wrap(queued)
            try:
                waiter.cancel()
                await asyncio.sleep(0)  # the waiter's done callbacks run
                assert queued.cancelled(), "the queued task was not cancelled with its waiter"
            finally:
                release.set()
            assert await blocker is True
        inbox.close()

    run(main())


def test_close_completes_what_is_queued_and_later_waits_still_work(
    run: Callable[[Coroutine[Any, Any, None]], None],
) -> None:
    async def main() -> None:
        inbox = Inbox()
        with ThreadPoolExecutor(1) as threads:
            start, posted = threading.Event(), threading.Event()
            source = threads.submit(start.wait, 10)
            waiter = inbox.wrap(source)
            # Callbacks run in the order added: once this one runs, the inbox has the result.
            source.add_done_callback(lambda _: posted.set())
            start.set()
            assert posted.wait(10)  # finished in the thread, its wakeup not yet read
            inbox.close()  # on the loop thread, before the loop ran the drain
            assert waiter.done() and waiter.result() is True
            # After close, a wrap falls back to asyncio's own hand-off.
            assert await inbox.wrap(threads.submit(pow, 2, 3)) == 8
        inbox.close()  # idempotent

    run(main())
