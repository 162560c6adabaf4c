"""``tessera standby refresh VM``: bring a VM's cold standby to a snapshot, in this process:
its options. What it runs is ``engine.cli.commands.standby``.

Registered by ``engine.cli.main.build_parser`` through ``register``; the key options are
passed in so this module does not import ``engine.cli.main`` (which imports it). The
daemon refreshes standbys itself after each replicated snapshot; both run ``engine.app.standby``.
This command is the run by hand, for a first copy or a check: through the daemon when one
answers on the configuration's socket (a ``standby`` job, ``POST /v1/standby``), else here::

    tessera standby refresh web01 --config /etc/tessera/config.yaml --cluster DR \\
        [--storage-domain dr-data] [--suffix -standby] [--snapshot ID] [--engine NAME]
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli.commands import Handler


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``standby refresh`` to the parser."""
    standby = sub.add_parser("standby", help="cold-standby copies of VMs on this site's engine")
    ssub = standby.add_subparsers(dest="standby_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "refresh",
        help="create the standby VM, or write the slots changed since its last refresh",
    )
    p.add_argument("vm", metavar="VM", help="the backed-up VM (name or id) in the store")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--engine", help="engine name in the configuration (if several)")
    p.add_argument("--cluster", required=True, help="the standby VM's cluster (name or id)")
    p.add_argument("--storage-domain", help="for the standby disks (default: as backed up)")
    p.add_argument("--suffix", default="-standby", help="standby VM name = VM name + suffix")
    p.add_argument("--snapshot", help="snapshot id or prefix (default: the VM's newest)")
    add_key_options(p)
    p.set_defaults(func=Handler("standby", "cmd_standby_refresh"))
