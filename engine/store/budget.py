"""Request budgets of a store whose packs live in a bucket (issue 18): requests per second
and per calendar month (UTC), beside the counters every S3 request already feeds.

Object stores bill and throttle by requests as much as by bytes; an on-prem RGW shared by
several tenants has per-user rate limits. A store's ``RemoteConfig`` may set:

- ``requests_per_second``: a token bucket (one second of burst). Every HTTP request the
  client sends — retries and probes too, as the endpoint counts them — waits for its token
  in the thread that sends it, so a backup slows down instead of being throttled by the
  endpoint (RGW answers 503 SlowDown, which costs retries).
- ``requests_per_month``: a hard budget. An operation begun when the month's count has
  reached it is refused with ``BudgetSpent`` naming the budget, the month and the count,
  before any request is sent; one already under way finishes (its retries included), so the
  count may pass the budget by what one operation sends. The count is kept in
  ``STORE/s3-requests.json`` (``{"month": "2026-12", "requests": N}``), added to under an
  flock by every process that opens the store (the writer and read-only opens alike), every
  ``FLUSH_EVERY`` requests and at close: a killed process loses at most that many.

0 means no limit (the default for both).
"""

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from engine.core.errors import BudgetSpent

FILENAME: Final = "s3-requests.json"
FLUSH_EVERY: Final = 100


def _month(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m")


class RequestBudget:
    def __init__(
        self,
        store: Path,
        per_second: float = 0,
        per_month: int = 0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.store = store
        self.path = store / FILENAME
        self.per_second = per_second
        self.per_month = per_month
        self._clock, self._now, self._sleep = clock, now, sleep
        self._lock = threading.Lock()
        self._tokens = per_second
        self._last = clock()
        self._month = _month(now())
        self._base = self._read(self._month)  # counted by every process before we opened
        self._unflushed = 0

    def _read(self, month: str) -> int:
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return 0
        if not isinstance(doc, dict) or doc.get("month") != month:
            return 0
        n = doc.get("requests")
        return n if isinstance(n, int) and n >= 0 else 0

    def used(self) -> tuple[str, int]:
        """(this month, requests counted in it so far, by every process)."""
        with self._lock:
            self._roll_locked()
            return self._month, self._base + self._unflushed

    def _roll_locked(self) -> None:
        month = _month(self._now())
        if month != self._month:
            self._flush_locked()
            self._month, self._base, self._unflushed = month, self._read(month), 0

    def admit(self) -> None:
        """Before an operation: ``BudgetSpent`` when the month's budget is spent."""
        if not self.per_month:
            return
        with self._lock:
            self._roll_locked()
            used = self._base + self._unflushed
            if used >= self.per_month:
                self._base = self._read(self._month)  # what others counted meanwhile
                used = self._base + self._unflushed
            if used >= self.per_month:
                raise BudgetSpent(
                    path=self.store,
                    reason=f"the bucket's request budget of {self.per_month} a month is spent "
                    f"({used} requests in {self._month}, UTC); raise requests_per_month in "
                    "config.json or wait for the next month",
                )

    def sent(self) -> None:
        """Each HTTP request, as it is sent: wait for a token, count it."""
        wait = 0.0
        with self._lock:
            self._roll_locked()
            self._unflushed += 1
            if self._unflushed >= FLUSH_EVERY:
                self._flush_locked()
            if self.per_second:
                t = self._clock()
                self._tokens = min(
                    self.per_second, self._tokens + (t - self._last) * self.per_second
                )
                self._last = t
                self._tokens -= 1
                if self._tokens < 0:
                    wait = -self._tokens / self.per_second
        if wait:
            self._sleep(wait)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        """Add what this process counted to the file, under an flock (other processes add
        theirs). A failure (a full disk) keeps the count here for the next flush."""
        if not self._unflushed:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            total = self._read(self._month) + self._unflushed
            body = json.dumps({"month": self._month, "requests": total}).encode() + b"\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
            self._base, self._unflushed = total, 0
        except OSError:
            return
        finally:
            os.close(fd)
