"""What ``tessera standby refresh`` runs (its options: ``engine.cli.standby``)."""

import argparse
import sys

from engine.app.standby import StandbyRequest, refresh
from engine.app.stores import open_for_jobs
from engine.cli.commands import service as cli_service
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.config.loader import load as load_config
from engine.config.policy import Standby
from engine.util import aio


def cmd_standby_refresh(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.config.parent / "conf.d")
    config.engine(args.engine)  # an unknown engine: exit 2 before the store opens
    if (socket := cli_service.daemon_socket(args.config)) is not None:
        # The daemon holds the store, and refreshes standbys itself: it runs this as a job,
        # one at a time per VM with its own refreshes.
        body = {"vm": args.vm, "cluster": args.cluster, "storage_domain": args.storage_domain}
        body |= {"suffix": args.suffix, "snapshot": args.snapshot, "engine": args.engine}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/standby", body))
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
