"""GC's memory is bounded independently of store size: a 2 M-chunk store is collected by a
fresh process whose peak RSS stays under ``PEAK_MIB`` (``VmHWM`` of the GC process; its
``getrusage`` figure would include this pytest process's RSS, see ``tests.bench.gc_bench``).

The store (built by ``tests.bench.gc_bench.build``: tiny records, 16 Ki per pack) makes
per-chunk state the only thing that could grow: 2 M ids as a Python set of 32-byte bytes
would alone cost ~200 MiB; the on-disk mark table and batched index scans keep GC's own
share to tens of MiB on top of the interpreter and the store's libraries. ``make bench``
(``python -m tests.bench gc``) runs the same store and reports the figures.
"""

from pathlib import Path

import pytest

from tests.bench.gc_bench import build_subprocess, gc_subprocess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 2_000_000
PEAK_MIB = 100  # whole process, interpreter and libraries included (measured: 68)
GROWTH_MIB = 50  # above the RSS once the store is open (measured: 27)


def test_gc_of_2m_chunks_stays_under_the_memory_bound(tmp_path: Path) -> None:
    path = tmp_path / "store"
    build_subprocess(path, N)
    doc = gc_subprocess(path)
    assert doc["index_chunks"] == N
    assert doc["marked"] == N * 7 // 8 // 2
    assert doc["deleted"] == N - doc["marked"]
    assert doc["packs_trashed"] > 0 and doc["packs_repacked"] > 0
    assert doc["rss_peak_mib"] < PEAK_MIB, doc
    assert doc["rss_peak_mib"] - doc["rss_open_mib"] < GROWTH_MIB, doc
