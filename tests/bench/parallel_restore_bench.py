"""Parallel restore bench (issue 17): a VM of two disks restored to local images one disk
after the other (``--disks-at-once 1``) and both at once (``--disks-at-once 2``), in the
same run, medians of 3.

- ``restore_2disks_sequential_seconds`` / ``restore_2disks_parallel_seconds``: the restore
  job's own seconds (its summary line), both disks;
- ``restore_2disks_parallel_vs_sequential``: parallel over sequential (target ≤ 0.6);
- ``restore_2disks_sequential_cores``: CPU seconds of the sequential run (the CLI and its
  qemu-nbd children) per second of its wall time: how much of the machine one disk at a time
  already uses;
- ``restore_2disks_parallel_vs_cpu_bound``: the parallel run's wall time over the least any
  restore doing the sequential run's CPU work could take on this machine (its CPU seconds /
  cores). Near 1, the parallel restore is bound by the cores; well above 1, something else
  (latency, a serial step, the storage) holds both disks back;
- ``restore_2disks_parallel_floor``: the least ``parallel_vs_sequential`` can be here, the
  sequential run's cores over the machine's (at least 1/2 for two disks);
- each again with ``_raw``: the same restore written as raw images (in place, no qemu-nbd)
  instead of the disks' recorded qcow2.

The disks are the pipeline bench's 1 GiB images (two seeds: real files, zeros, 256 MiB
incompressible each), backed up as one VM with ``backup image --vm``.

    python -m tests.bench parallel-restore
"""

import os
import re
import resource
import shutil
import statistics
from collections.abc import Callable

from tests.bench.data import CACHE
from tests.bench.pipeline_bench import mixed_image, tessera

Report = Callable[[str, float, str], None]
ROUNDS = 3


def run(report: Report) -> None:
    work = CACHE / "parallel-restore"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    disks = [
        mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1),
        mixed_image(CACHE / "mixed-1g-b.qcow2", 1, seed=2),
    ]
    store = work / "store"
    tessera("store", "init", store)
    tessera("backup", "image", *disks, "--store", store, "--vm", "two", "--level", "full")
    snap = tessera("snapshots", "--store", store)[0].splitlines()[1].split()[0]

    def seconds(at_once: int, fmt: str) -> tuple[float, float, float]:
        """(the job's seconds, the run's wall seconds, its CPU seconds with children)"""
        target = work / f"restored-{at_once}-{fmt}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        args = ["restore", snap, "--store", store, "--to", target, "--disks-at-once", str(at_once)]
        out, wall = tessera(*args, "--format", fmt)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        m = re.search(r"succeeded: snapshot \S+ \(2 disks\), wrote .*?, ([\d.]+) s,", out)
        assert m, out
        shutil.rmtree(target, ignore_errors=True)
        return float(m.group(1)), wall, cpu

    cores = os.cpu_count() or 1
    # qcow2 (the disks' recorded format: written through qemu-nbd) keeps the figures' plain
    # names; raw (written in place, engine.io.direct_write) reports them with a _raw suffix
    for fmt, suffix in (("qcow2", ""), ("raw", "_raw")):
        rounds: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
        for _ in range(ROUNDS):  # interleaved: a slow moment of the machine hits both
            for at_once in (1, 2):
                rounds[at_once].append(seconds(at_once, fmt))

        def median(
            at_once: int, i: int, rounds: dict[int, list[tuple[float, float, float]]] = rounds
        ) -> float:
            return statistics.median(r[i] for r in rounds[at_once])

        sequential, parallel = median(1, 0), median(2, 0)
        report(f"restore_2disks_sequential_seconds{suffix}", sequential, "s")
        report(f"restore_2disks_parallel_seconds{suffix}", parallel, "s")
        report(f"restore_2disks_parallel_vs_sequential{suffix}", parallel / sequential, "ratio")
        seq_cores = median(1, 2) / median(1, 1)
        report(f"restore_2disks_sequential_cores{suffix}", seq_cores, "cores")
        # the least parallel/sequential any restore could reach here: the sequential run's
        # CPU spread over every core
        report(f"restore_2disks_parallel_floor{suffix}", max(seq_cores / cores, 1 / 2), "ratio")
        cpu_bound = median(2, 1) / (median(1, 2) / cores)
        report(f"restore_2disks_parallel_vs_cpu_bound{suffix}", cpu_bound, "ratio")
    shutil.rmtree(work, ignore_errors=True)
