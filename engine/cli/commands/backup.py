"""What ``tessera backup image`` runs (its options: ``engine.cli.main``), in this process
through ``engine.app.backup``; ``backup vm`` is ``vm``'s."""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.app.backup import backup_sources
from engine.cli.commands.stores import job_store, open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.core.errors import ConfigError
from engine.jobs.backup import BackupOutcome, Progress
from engine.jobs.states import State
from engine.sources import registry
from engine.store.chunk_store import Store
from engine.util import aio


@contextmanager
def backup_progress(vm: str) -> Iterator[Progress]:
    with ProgressDisplay(f"backup {vm}") as display:

        def show(disk: str, done: int, total: int) -> None:
            display.update(Path(disk).name, done, total)

        yield show


def print_backup(outcome: BackupOutcome) -> bool:
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
                target, sources, level=args.level, readers=args.readers, progress=backup_progress
            )
            async for outcome in backups:
                failed += not print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))
