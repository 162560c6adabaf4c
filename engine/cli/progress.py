"""Progress for CLI jobs: bars (bytes, rate, ETA) on a terminal, plain lines otherwise.

``ProgressDisplay.update(disk, done, total)`` may be called at any rate; plain output is
throttled to one line per disk every ``PLAIN_INTERVAL`` seconds plus one at completion, so
logs stay readable when stderr is a file or journald. Sizes and rates are written by
``engine.core.units`` (binary units), on bars and plain lines alike.

A rate is what this display saw move: bytes since the disk's first update over the time
since then. A job followed after it finished (or a disk whose first update is its last)
moved nothing while watched, so its line has no rate and no ETA rather than a rate divided
by the microsecond between two calls.
"""

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Final, TextIO

from engine.core.units import human_bytes, human_rate

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

PLAIN_INTERVAL: Final = 5.0  # seconds between plain progress lines per disk
# A rate measured over less than this is noise (two callbacks microseconds apart), not a rate.
MIN_RATE_SECONDS: Final = 0.5


class ProgressDisplay:
    def __init__(self, label: str, stream: TextIO | None = None, force_plain: bool = False):
        self._stream = stream or sys.stderr
        self._label = label
        self._rich: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._plain: dict[str, float] = {}  # disk → time of its last plain line
        self._started: dict[str, tuple[float, int]] = {}  # disk → (time, done) first seen
        if not force_plain and self._stream.isatty():
            # Here, not at the top: rich (~30 ms) loads only to draw bars on a terminal, not
            # for a command whose output goes to a file or journald (issue 15).
            from rich import progress as bars  # noqa: PLC0415

            self._rich = bars.Progress(
                bars.TextColumn("{task.description}"),
                bars.BarColumn(),
                bars.DownloadColumn(binary_units=True),
                bars.TextColumn("{task.fields[rate]}"),  # rich's own column is in MB/s
                bars.TimeRemainingColumn(),
                transient=False,
            )

    def __enter__(self) -> "ProgressDisplay":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()

    def update(self, disk: str, done: int, total: int) -> None:
        now = time.monotonic()
        start, done_at_start = self._started.setdefault(disk, (now, done))
        elapsed = now - start
        rate = (done - done_at_start) / elapsed if elapsed >= MIN_RATE_SECONDS else None
        if self._rich is not None:
            shown = human_rate(rate) if rate is not None else ""
            if disk not in self._tasks:
                self._tasks[disk] = self._rich.add_task(
                    f"{self._label} {disk}", total=total, rate=shown
                )
            self._rich.update(self._tasks[disk], completed=done, rate=shown)
            return
        last = self._plain.get(disk)
        if done < total and last is not None and now - last < PLAIN_INTERVAL:
            return
        self._plain[disk] = now
        print(plain_line(f"{self._label} {disk}", done, total, rate), file=self._stream, flush=True)


def plain_line(what: str, done: int, total: int, rate: float | None) -> str:
    """One plain progress line: ``backup vm1 sda: 1.5 GiB of 4.0 GiB (38%), 183.2 MiB/s,
    ETA 14 s``; without a rate (``None``: not measured) it has neither rate nor ETA."""
    pct = 100.0 * done / total if total else 100.0
    line = f"{what}: {human_bytes(done)} of {human_bytes(total)} ({pct:.0f}%)"
    if rate is None:
        return line
    line += f", {human_rate(rate)}"
    if done < total and rate > 0:
        line += f", ETA {(total - done) / rate:.0f} s"
    return line
