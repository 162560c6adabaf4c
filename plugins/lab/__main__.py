"""``python -m plugins.lab run --dir D``: the lab process that ``tessera lab up`` starts."""

import argparse
import asyncio
from pathlib import Path

from plugins.lab.lab import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m plugins.lab")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(run(args.dir.resolve()))


if __name__ == "__main__":
    main()
