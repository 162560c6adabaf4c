"""Leases: what GC must know about the sessions that may reference chunks not yet committed.

A *lease* is taken by every session that puts chunks or references stored chunks in a
snapshot it has not committed yet — ``SnapshotWriter`` takes one for its whole life (backups
get it without doing anything), a replication receiver takes one with ``Store.lease``. Its
``start`` is a stamp of the store's ``LeaseClock``; GC compares it with the stamps it writes
on the chunks it condemns (see the protocol in the package docstring).

Leases live in memory in the one writing process (the writer lock makes every session and
every GC of a store run in the process that holds it), so they need no durability: a
process that dies takes its sessions with it, and its uncommitted snapshots are deleted by
the next open.
"""

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class LeaseClock:
    """Strictly increasing nanosecond stamps: wall time, never going backwards in-process.

    Stamps written by an earlier process are compared with this process's stamps; a wall
    clock set back between the two only makes GC wait longer (see ``engine.maint.gc``).
    """

    def __init__(self, source: Callable[[], int] = time.time_ns):
        self._source = source
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            self._last = max(self._source(), self._last + 1)
            return self._last


@dataclass(frozen=True)
class Lease:
    id: int
    kind: str  # backup | replication | ...
    what: str  # snapshot id, peer, ... (for messages)
    start: int  # LeaseClock stamp


class LeaseWatch:
    """The oldest start of every lease live when the watch began or begun while it runs."""

    def __init__(self, oldest: int | None):
        self.oldest = oldest
        self.seen: list[Lease] = []  # leases live at any time during the watch (for reports)

    def _saw(self, lease: Lease) -> None:
        self.seen.append(lease)
        if self.oldest is None or lease.start < self.oldest:
            self.oldest = lease.start


class LeaseRegistry:
    """The leases of one open store. Thread-safe."""

    def __init__(self, clock: LeaseClock | None = None):
        self.clock = clock or LeaseClock()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[int, Lease] = {}
        self._watches: list[LeaseWatch] = []

    def begin(self, kind: str, what: str) -> Lease:
        with self._lock:
            lease = Lease(next(self._ids), kind, what, self.clock.now())
            self._live[lease.id] = lease
            for w in self._watches:
                w._saw(lease)
        return lease

    def end(self, lease: Lease) -> None:
        """Release a lease (idempotent)."""
        with self._lock:
            self._live.pop(lease.id, None)

    def live(self) -> list[Lease]:
        with self._lock:
            return sorted(self._live.values(), key=lambda lease: lease.start)

    @contextmanager
    def hold(self, kind: str, what: str) -> Iterator[Lease]:
        lease = self.begin(kind, what)
        try:
            yield lease
        finally:
            self.end(lease)

    @contextmanager
    def watch(self) -> Iterator[LeaseWatch]:
        """Track the oldest lease live at any moment from now until the block exits."""
        with self._lock:
            w = LeaseWatch(None)
            for lease in self._live.values():
                w._saw(lease)
            self._watches.append(w)
        try:
            yield w
        finally:
            with self._lock:
                self._watches.remove(w)
