"""Progress for CLI jobs: bars (bytes, rate, ETA) on a terminal, plain lines otherwise.

``ProgressDisplay.update(disk, done, total)`` may be called at any rate; plain output is
throttled to one line per disk every ``PLAIN_INTERVAL`` seconds plus one at completion, so
logs stay readable when stderr is a file or journald.
"""

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, Final, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

PLAIN_INTERVAL: Final = 5.0  # seconds between plain progress lines per disk


class ProgressDisplay:
    def __init__(self, label: str, stream: TextIO | None = None, force_plain: bool = False):
        self._stream = stream or sys.stderr
        self._label = label
        self._rich: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._plain: dict[str, tuple[float, int]] = {}
        self._started: dict[str, float] = {}
        if not force_plain and self._stream.isatty():
            # Here, not at the top: rich (~30 ms) loads only to draw bars on a terminal, not
            # for a command whose output goes to a file or journald (issue 15).
            from rich import progress as bars  # noqa: PLC0415

            self._rich = bars.Progress(
                bars.TextColumn("{task.description}"),
                bars.BarColumn(),
                bars.DownloadColumn(binary_units=True),
                bars.TransferSpeedColumn(),
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
        if self._rich is not None:
            if disk not in self._tasks:
                self._tasks[disk] = self._rich.add_task(f"{self._label} {disk}", total=total)
            self._rich.update(self._tasks[disk], completed=done)
            return
        now = time.monotonic()
        start = self._started.setdefault(disk, now)
        last, _ = self._plain.get(disk, (start, -1))
        if done < total and now - last < PLAIN_INTERVAL:
            return
        self._plain[disk] = (now, done)
        elapsed = max(now - start, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0.0
        pct = 100.0 * done / total if total else 100.0
        print(
            f"{self._label} {disk}: {done / 2**20:.1f}/{total / 2**20:.1f} MiB ({pct:.0f}%), "
            f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f} s",
            file=self._stream,
            flush=True,
        )
