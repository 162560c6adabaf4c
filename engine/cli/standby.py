"""``tessera standby refresh VM``: bring a VM's cold standby to a snapshot, in this process.

Registered by ``engine.cli.main.build_parser`` through ``register``; ``open_store`` and the
key options are passed in so this module does not import ``cli`` (which imports it). The
daemon refreshes standbys itself after each replicated snapshot; both run ``engine.app.standby``.
This command is the direct run, for a first copy or by hand::

    tessera standby refresh web01 --config /etc/tessera/config.yaml --cluster DR \\
        [--storage-domain dr-data] [--suffix -standby] [--snapshot ID] [--engine NAME]
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from engine.app.standby import StandbyRequest, refresh
from engine.app.stores import open_for_jobs
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.config.loader import load as load_config
from engine.config.policy import Standby
from engine.store.chunk_store import Store
from engine.util import aio

OpenStore = Callable[[argparse.Namespace, bool], Store]


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    open_store: OpenStore,
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
    p.set_defaults(func=lambda args: cmd_standby_refresh(args, open_store))


def cmd_standby_refresh(args: argparse.Namespace, open_store: OpenStore) -> int:
    config = load_config(args.config, args.config.parent / "conf.d")
    config.engine(args.engine)  # an unknown engine: exit 2 before the store opens
    standby = Standby(
        peer="local",  # a direct run: the snapshots are already in this store
        cluster=args.cluster,
        storage_domain=args.storage_domain,
        name_suffix=args.suffix,
    )
    request = StandbyRequest(args.vm, standby, args.snapshot, args.engine)
    with open_store(args, True) as store:

        async def run() -> int:
            target, recovered = await open_for_jobs(str(store.path), store)
            for line in recovered:
                print(f"recovery: {line}", file=sys.stderr)
            try:
                with ProgressDisplay(f"standby {args.vm}") as display:
                    outcome = await refresh(config, target, request, progress=display.update)
            finally:
                await target.pool.aclose()
            if outcome.restore is not None:
                for stats in outcome.restore.disks:
                    print(stats.summary())
            for action in outcome.actions:
                print(f"standby: {action}")
            print(outcome.summary())
            if outcome.ok and outcome.standby_vm_id:
                print(f"standby VM {outcome.standby_vm_name} id {outcome.standby_vm_id}")
            return EXIT_OK if outcome.ok else EXIT_FAILED

        return aio.run(run())
