"""``make bench``: every figure printed as ``bench: NAME VALUE UNIT`` for scripts, and all of
them written to ``bench-data/summary.json`` (name → value and unit, plus the machine).

``python -m tests.bench [store] [pipeline] [ovirt] [replication] [gc] [verify] [cli] [export]
[parallel-restore] [s3]`` runs only those parts; ``pipeline`` alone takes the CPU limits from
``--cpu-limit MB/s`` and ``--restore-limit MB/s`` (else the ratios against them are
meaningless).
"""

import json
import os
import platform
import sys
import time

from tests.bench import (
    cli_bench,
    export_bench,
    gc_bench,
    ovirt_bench,
    parallel_restore_bench,
    pipeline_bench,
    replication_bench,
    s3_bench,
    store_bench,
    verify_bench,
)
from tests.bench.data import CACHE

FIGURES: dict[str, dict[str, float | str]] = {}


def report(name: str, value: float, unit: str) -> None:
    FIGURES[name] = {"value": round(value, 6), "unit": unit}
    print(f"bench: {name} {value:.3f} {unit}", flush=True)


def _option(args: list[str], name: str, default: float) -> float:
    return float(args[args.index(name) + 1]) if name in args else default


def main() -> int:
    print(f"# python {sys.version.split()[0]}", flush=True)
    only = sys.argv[1:]
    started = time.time()
    limits = {"backup": 0.0, "restore": 0.0}
    if not only or "store" in only:
        limits = store_bench.run(report)
    if not only or "pipeline" in only:
        if not limits["backup"]:
            limits = {
                "backup": _option(only, "--cpu-limit", 1e9),
                "restore": _option(only, "--restore-limit", 1e9),
            }
        pipeline_bench.run(report, limits)
    if not only or "ovirt" in only:
        ovirt_bench.run(report)
    if not only or "replication" in only:
        replication_bench.run(report)
    if not only or "gc" in only:
        gc_bench.run(report)
    if not only or "verify" in only:
        verify_bench.run(report)
    if not only or "cli" in only:
        cli_bench.run(report)
    if not only or "export" in only:
        export_bench.run(report)
    if not only or "parallel-restore" in only:
        parallel_restore_bench.run(report)
    if not only or "s3" in only:
        s3_bench.run(report)
    summary = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "parts": only or ["all"],
        "machine": {
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "figures": FIGURES,
    }
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"# summary: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
