"""Request budgets (``engine.store.budget``): a token bucket per second, a durable count per
calendar month shared by every process that opens the store."""

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.core.errors import BudgetSpent
from engine.store.budget import FILENAME, FLUSH_EVERY, RequestBudget


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def test_requests_per_second_wait_for_their_token(tmp_path: Path) -> None:
    clock = Clock()
    budget = RequestBudget(tmp_path, per_second=10, clock=clock, sleep=clock.sleep)
    for _ in range(10):  # one second of burst
        budget.sent()
    assert clock.slept == []
    budget.sent()
    assert clock.slept == [pytest.approx(0.1)]
    for _ in range(9):
        budget.sent()
    assert sum(clock.slept) == pytest.approx(1.0)  # 20 requests: two seconds in all
    clock.t += 5  # idle: the bucket refills to one second's burst, no more
    for _ in range(10):
        budget.sent()
    assert sum(clock.slept) == pytest.approx(1.0)


def test_the_month_budget_refuses_work_and_names_it(tmp_path: Path) -> None:
    now = [datetime(2026, 12, 31, 23, 0, tzinfo=UTC)]
    budget = RequestBudget(tmp_path, per_month=5, now=lambda: now[0])
    for _ in range(5):
        budget.admit()
        budget.sent()
    with pytest.raises(BudgetSpent, match=r"budget of 5 a month is spent \(5 requests in 2026-12"):
        budget.admit()
    budget.flush()
    assert json.loads((tmp_path / FILENAME).read_text()) == {"month": "2026-12", "requests": 5}
    now[0] = datetime(2027, 1, 1, 0, 1, tzinfo=UTC)  # a new month: a new budget
    budget.admit()
    budget.sent()
    assert budget.used() == ("2027-01", 1)


def test_processes_add_their_counts(tmp_path: Path) -> None:
    one, two = RequestBudget(tmp_path, per_month=1000), RequestBudget(tmp_path, per_month=1000)
    threads = [
        threading.Thread(target=lambda b=b: [b.sent() for _ in range(3 * FLUSH_EVERY + 7)])
        for b in (one, two)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one.flush()
    two.flush()
    month = datetime.now(UTC).strftime("%Y-%m")
    assert json.loads((tmp_path / FILENAME).read_text()) == {
        "month": month,
        "requests": 2 * (3 * FLUSH_EVERY + 7),
    }
    three = RequestBudget(tmp_path, per_month=2 * (3 * FLUSH_EVERY + 7))
    with pytest.raises(BudgetSpent):  # what the others counted counts here too
        three.admit()
