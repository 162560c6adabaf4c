"""What ``tessera backup image|vm`` runs (its options: ``engine.cli.main``): in this
process through ``engine.app.backup``, or, for ``backup vm``, through a running daemon when
one answers."""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.app.backup import backup_sources, backup_vms
from engine.app.requests import VmBackupRequest
from engine.cli.commands import service as cli_service
from engine.cli.commands.store import job_store, open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.config.loader import load as load_config
from engine.core.errors import ConfigError
from engine.jobs.backup import BackupOutcome, Progress
from engine.jobs.states import State
from engine.sources import registry
from engine.store.chunk_store import Store
from engine.util import aio


@contextmanager
def _progress(vm: str) -> Iterator[Progress]:
    with ProgressDisplay(f"backup {vm}") as display:

        def show(disk: str, done: int, total: int) -> None:
            display.update(Path(disk).name, done, total)

        yield show


def _print_backup(outcome: BackupOutcome) -> bool:
    """Print a backup's notes, warnings and summary; True when it succeeded."""
    for note in outcome.notes:
        print(f"note: {note}")
    for warning in outcome.record.warnings:
        print(f"warning: {warning}")
    print(outcome.summary())
    return outcome.record.state is State.SUCCEEDED


def cmd_backup_image(args: argparse.Namespace) -> int:
    for path in args.paths:
        if not path.is_file():
            raise ConfigError(message=f"image {path} does not exist or is not a file")
    _, images = registry.images()
    groups = [args.paths] if args.vm else [[p] for p in args.paths]
    sources = [images.image_source(g, args.vm) for g in groups]

    async def run(store: Store) -> int:
        target = await job_store(store)
        failed = 0
        try:
            backups = backup_sources(
                target, sources, level=args.level, readers=args.readers, progress=_progress
            )
            async for outcome in backups:
                failed += not _print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


def cmd_backup_vm(args: argparse.Namespace) -> int:
    """Through the daemon when one answers on the config's socket (it holds the store),
    else in this process (``engine.app.backup``)."""
    request = VmBackupRequest(
        vms=tuple(args.names),
        level=args.level,
        flow=args.flow,
        require_quiesce=args.require_quiesce,
        engine=args.engine,
        readers=args.readers,
    )
    request.check()
    if not args.direct and (socket := cli_service.daemon_socket(args.config)) is not None:
        body = {"vms": args.names, "level": args.level, "flow": args.flow}
        body |= {"require_quiesce": args.require_quiesce, "engine": args.engine}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/backups", body))
    config = load_config(args.config, args.config.parent / "conf.d")

    async def run(store: Store) -> int:
        target = await job_store(store)
        failed = 0
        try:
            async for outcome in backup_vms(config, target, request, progress=_progress):
                failed += not _print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))
