"""``make bench``: every figure printed as ``bench: NAME VALUE UNIT`` for scripts."""

import sys

from tests.bench import store_bench


def report(name: str, value: float, unit: str) -> None:
    print(f"bench: {name} {value:.3f} {unit}", flush=True)


def main() -> int:
    print(f"# python {sys.version.split()[0]}", flush=True)
    store_bench.run(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
