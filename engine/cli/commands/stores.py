"""How a command opens its store: ``open_store`` (``--store``/``path``, else the
configuration's; what opening it found goes to stderr) and ``job_store`` (the store readied
for jobs: unfinished jobs recovered, a CPU pool), for every command of ``commands``."""

import argparse
import sys

from engine.app.stores import JobStore, open_for_jobs
from engine.app.stores import open_store as app_open_store
from engine.store.chunk_store import Store


def open_store(args: argparse.Namespace, writable: bool) -> Store:
    """The store of ``--store``/``path``, else the configuration's (``--config``); its
    passphrase from ``--passphrase-file``, the environment or a prompt."""
    path = getattr(args, "store", None) or getattr(args, "path", None)
    passphrase_file, key_file = args.passphrase_file, args.key_file
    if path is None:  # from the daemon configuration
        # Here, not at the top: the configuration (its loader and models) loads only for a
        # command given --config, not for every command that opens a store (issue 15).
        from engine.config.loader import load as load_config  # noqa: PLC0415

        section = load_config(args.config, args.config.parent / "conf.d").store()
        path = section.path
        passphrase_file = passphrase_file or section.passphrase_file
        key_file = key_file or section.key_file
    store = app_open_store(
        path, passphrase_file=passphrase_file, key_file=key_file, writable=writable
    )
    if not writable:
        for line in store.db_problems.values():
            print(f"store {path}: {line}: using a temporary copy", file=sys.stderr)
    for line in store.report.lines():
        print(f"store recovery: {line}", file=sys.stderr)
    return store


async def job_store(store: Store) -> JobStore:
    """``store`` ready for jobs; what recovering its unfinished jobs did goes to stderr."""
    target, recovered = await open_for_jobs(str(store.path), store)
    for line in recovered:
        print(f"recovery: {line}", file=sys.stderr)
    return target
