"""What ``tessera restore`` runs (its options: ``engine.cli.main``): local image files
(``--to``) in this process through ``engine.app.restore``; without ``--to``, a new VM in the
engine, which is ``vm``'s."""

import argparse
from dataclasses import replace
from pathlib import Path

from engine.app.requests import ImageRestoreRequest
from engine.app.restore import restore_images
from engine.cli.commands import Handler
from engine.cli.commands.stores import job_store, open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.core.errors import ConfigError
from engine.jobs.states import State
from engine.store.chunk_store import Store
from engine.util import aio


def cmd_restore(args: argparse.Namespace) -> int:
    if args.to is None:  # a new VM in the engine: the configuration's, through the daemon
        return Handler("vm", "cmd_restore_vm")(args)
    if args.flow != "imageio":
        raise ConfigError(message="restore: --flow applies to a new VM (--config without --to)")
    request = ImageRestoreRequest(args.snapshot, Path(args.to), args.disk, args.image_format)
    if args.disks_at_once is not None:
        request = replace(request, disks_at_once=args.disks_at_once)

    async def run(store: Store) -> int:
        target = await job_store(store)
        try:
            manifest = store.manifest(store.resolve(request.snapshot))
            with ProgressDisplay(f"restore {manifest.vm_name}") as display:
                outcome = await restore_images(target, request, progress=display.update)
        finally:
            await target.pool.aclose()
        for stats in outcome.disks:
            print(stats.summary())
        print(outcome.summary())
        return EXIT_OK if outcome.record.state is State.SUCCEEDED else EXIT_FAILED

    # Read-only: a restore writes nothing in the store, so it runs beside the daemon or a
    # backup holding the writer lock (its journal record names this process as its owner).
    with open_store(args, writable=False) as store:
        return aio.run(run(store))
