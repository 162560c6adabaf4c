"""``make bench``: every figure printed as ``bench: NAME VALUE UNIT`` for scripts."""

import sys

from tests.bench import (
    gc_bench,
    ovirt_bench,
    pipeline_bench,
    replication_bench,
    store_bench,
    verify_bench,
)


def report(name: str, value: float, unit: str) -> None:
    print(f"bench: {name} {value:.3f} {unit}", flush=True)


def main() -> int:
    print(f"# python {sys.version.split()[0]}", flush=True)
    only = sys.argv[1:]
    cpu_limit = store_bench.run(report) if not only or "store" in only else 0.0
    if not only or "pipeline" in only:
        if not cpu_limit:
            cpu_limit = float(only[only.index("--cpu-limit") + 1]) if "--cpu-limit" in only else 1e9
        pipeline_bench.run(report, cpu_limit)
    if not only or "ovirt" in only:
        ovirt_bench.run(report)
    if not only or "replication" in only:
        replication_bench.run(report)
    if not only or "gc" in only:
        gc_bench.run(report)
    if not only or "verify" in only:
        verify_bench.run(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
