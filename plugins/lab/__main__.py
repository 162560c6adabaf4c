"""``python -m plugins.lab run --dir D``: the lab process that ``tessera lab up`` starts."""

import argparse
import asyncio
from pathlib import Path

from plugins.lab.engine import sso
from plugins.lab.lab import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m plugins.lab")
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--sso-idle-timeout", type=float, default=sso.IDLE_TIMEOUT)
    parser.add_argument("--sso-lifetime", type=float, default=sso.LIFETIME)
    parser.add_argument(
        "--knob", action="append", default=[], metavar="FIELD=VALUE", help="a Faults field"
    )
    args = parser.parse_args()
    knobs = {}
    for knob in args.knob:
        name, _, value = knob.partition("=")
        knobs[name] = float(value)
    asyncio.run(
        run(
            args.dir.resolve(),
            None,
            knobs,
            sso_idle_timeout=args.sso_idle_timeout,
            sso_lifetime=args.sso_lifetime,
        )
    )


if __name__ == "__main__":
    main()
