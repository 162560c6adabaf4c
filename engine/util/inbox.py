"""Results of worker threads handed to the event loop, the wakeup sent without the GIL.

``asyncio.wrap_future`` completes a loop future from the worker thread with
``loop.call_soon_threadsafe``. On uvloop that wakes the loop (``uv_async_send``, a write to an
eventfd) *with the GIL held*: the woken loop thread, or the NBD server the loop then talks
to, often takes the worker's core at once, and the worker sits preempted while holding the
GIL, so every thread of the process waits. In a backup on a 2-core machine ``py-spy --gil``
showed that one line as the largest holder of the GIL: 0.17–0.40 s per GiB, more than
hashing, encryption and the index together.

An ``Inbox`` does the same hand-off with the wakeup outside the GIL: the worker appends the
finished future to a deque and, unless a wakeup is already pending, writes one byte to a pipe
with ``os.write`` (which releases the GIL around the syscall); the loop reads the pipe
(``add_reader``) and completes every waiting future it finds. Wakeups coalesce: a burst of
completions costs one. Ordering argument (all under the GIL, so plain assignments are
atomic)::

    worker:  append(item) ─→ lock: if not pending: pending = True; write(byte)
    loop:    read(bytes) ─→ pending = False ─→ pop items until empty

An item appended while ``pending`` was still set is popped by the drain that clears it; one
appended after the loop cleared ``pending`` makes its own wakeup. The read comes first: it
releases the GIL, and clearing ``pending`` before it could let it swallow a worker's fresh
byte and leave ``pending`` set over an empty pipe (a lost wakeup; seen, then fixed). At worst
a drain finds nothing.

Cancellation follows ``wrap_future``: cancelling the loop future cancels the thread's future
if it has not started. ``close()`` (on the loop thread) completes whatever is still queued,
then removes the reader and closes the pipe; a thread finishing after that is ignored (the
owner waits for its threads before closing, so there is none in practice). An inbox belongs
to the first loop that uses it; a call from another loop falls back to ``wrap_future``.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import threading
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple[asyncio.Future[Any], concurrent.futures.Future[Any]]


class Inbox:
    """Completes event-loop futures from worker threads (see the module docstring)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rfd = self._wfd = -1
        self._items: collections.deque[_Item] = collections.deque()
        self._pending = False  # a wakeup byte is in the pipe, or about to be
        self._lock = threading.Lock()  # guards the pipe's descriptors against close()
        self._closed = False

    def wrap(self, future: "concurrent.futures.Future[T]") -> "asyncio.Future[T]":
        """A loop future that completes as ``future`` does (``asyncio.wrap_future``)."""
        loop = asyncio.get_running_loop()
        if self._closed or self._loop not in (None, loop):
            return asyncio.wrap_future(future)
        if self._loop is None:
            self._open(loop)
        waiter: asyncio.Future[T] = loop.create_future()

        def cancel_source(w: asyncio.Future[T]) -> None:
            if w.cancelled():
                future.cancel()

        waiter.add_done_callback(cancel_source)
        future.add_done_callback(lambda f: self._post((waiter, f)))
        return waiter

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = loop
        loop.add_reader(self._rfd, self._drain)

    def _post(self, item: _Item) -> None:
        """Any thread: queue a finished future; wake the loop unless a wakeup is pending."""
        self._items.append(item)
        if self._pending:
            return
        with self._lock:
            if self._closed or self._pending:
                return
            self._pending = True
            with contextlib.suppress(BlockingIOError):  # the pipe holds wakeups already
                os.write(self._wfd, b"\0")  # releases the GIL: the point of this class

    def _drain(self) -> None:
        """The loop thread: complete every queued future."""
        # The pipe first, then the flag: a wakeup written while os.read runs (without the
        # GIL) may be the byte it takes, and must not leave ``pending`` set with an empty pipe.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._rfd, 4096)
        self._pending = False
        items = self._items
        while items:
            waiter, source = items.popleft()
            if waiter.done():
                continue  # cancelled meanwhile
            if source.cancelled():
                waiter.cancel()
                continue
            error = source.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(source.result())

    def close(self) -> None:
        """The loop thread: complete what is queued, then stop; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._loop is None:
            return
        self._drain()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._rfd)
        os.close(self._rfd)
        os.close(self._wfd)
