"""Plain progress lines (stderr not a terminal): sizes and rates in the binary units of
``engine.core.units``, and a rate only when one was measured (issue 16: a followed job that
had finished showed ``2147483648.0 MB/s``)."""

import io
import re
from pathlib import Path

import pytest

from engine.cli import progress
from engine.cli.progress import ProgressDisplay
from engine.core.units import GiB, MiB, human_bytes, human_rate

ROOT = Path(__file__).resolve().parents[3]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_finished_job_has_no_rate(clock: Clock) -> None:
    """Its first update is its last: nothing moved while it was watched."""
    out = io.StringIO()
    with ProgressDisplay("backup vm1", out, force_plain=True) as display:
        display.update("sda", 2 * GiB, 2 * GiB)
        clock.now += 1e-6
        display.update("sda", 2 * GiB, 2 * GiB)
    assert lines(out) == ["backup vm1 sda: 2.0 GiB of 2.0 GiB (100%)"] * 2


def test_rate_and_eta_are_what_moved_since_the_first_update(clock: Clock) -> None:
    out = io.StringIO()
    with ProgressDisplay("restore vm1", out, force_plain=True) as display:
        display.update("sda", 1 * GiB, 4 * GiB)  # joined a running job: 1 GiB already done
        clock.now += 10
        display.update("sda", 2 * GiB, 4 * GiB)
        clock.now += 1  # within PLAIN_INTERVAL: no line
        display.update("sda", 2 * GiB + MiB, 4 * GiB)
        clock.now += 9
        display.update("sda", 4 * GiB, 4 * GiB)
    assert lines(out) == [
        "restore vm1 sda: 1.0 GiB of 4.0 GiB (25%)",
        "restore vm1 sda: 2.0 GiB of 4.0 GiB (50%), 102.4 MiB/s, ETA 20 s",
        "restore vm1 sda: 4.0 GiB of 4.0 GiB (100%), 153.6 MiB/s",
    ]


def test_one_unit_style() -> None:
    assert human_bytes(4096 * MiB) == "4.0 GiB"
    assert human_bytes(512) == "512 B"
    assert human_rate(1536 * 1024) == "1.5 MiB/s"


# A size or rate written with a unit of its own: ``{n / MiB:.1f} MiB``, ``{rate:.0f} MB/s``.
OWN_UNIT = re.compile(r"\}\s*(KiB|MiB|GiB|TiB|kB|KB|MB|GB)(/s)?\b")
# The lab's OVF copies ovirt-engine's own text ("1024 MB of memory"), not Tessera's output.
OTHERS_TEXT = {Path("plugins/lab/engine/ovf.py")}


def test_sizes_are_written_by_one_formatter() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for package in ("engine", "plugins")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.relative_to(ROOT) not in OTHERS_TEXT
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OWN_UNIT.search(line)
    ]
    assert found == [], "format sizes with engine.core.units.human_bytes / human_rate"
