"""What ``tessera backup vm`` and ``tessera restore --config`` (a new VM, no ``--to``) run
(their options: ``engine.cli.main``): the commands that go through the engine of the daemon
configuration — through a running daemon when one answers on its socket (it holds the
store's writer lock), else in this process through ``engine.app``."""

import argparse

from engine.app.backup import backup_vms
from engine.app.requests import VmBackupRequest, VmRestoreRequest
from engine.app.restore import plan_vm_restore, restore_vm
from engine.cli.commands import service as cli_service
from engine.cli.commands.backup import backup_progress, print_backup
from engine.cli.commands.stores import job_store, open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.config.loader import load as load_config
from engine.core.errors import ConfigError
from engine.store.chunk_store import Store
from engine.util import aio


def cmd_backup_vm(args: argparse.Namespace) -> int:
    """Through the daemon when one answers on the config's socket (it holds the store),
    else in this process (``engine.app.backup``); ``--dry-run`` here, reading only
    (``engine.cli.commands.plan``)."""
    if args.dry_run:
        from engine.cli.commands.plan import cmd_backup_dry_run  # noqa: PLC0415

        return cmd_backup_dry_run(args)
    request = VmBackupRequest(
        vms=tuple(args.names),
        level=args.level,
        flow=args.flow,
        require_quiesce=args.require_quiesce,
        engine=args.engine,
        readers=args.readers,
        disks=tuple(args.disks),
    )
    request.check()
    if not args.direct and (socket := cli_service.daemon_socket(args.config)) is not None:
        body = {"vms": args.names, "level": args.level, "flow": args.flow}
        body |= {"require_quiesce": args.require_quiesce, "engine": args.engine}
        body |= {"disks": args.disks} if args.disks else {}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/backups", body))
    config = load_config(args.config, args.config.parent / "conf.d")

    async def run(store: Store) -> int:
        target = await job_store(store)
        failed = 0
        try:
            async for outcome in backup_vms(config, target, request, progress=backup_progress):
                failed += not print_backup(outcome)
        finally:
            await target.pool.aclose()
        return EXIT_FAILED if failed else EXIT_OK

    with open_store(args, writable=True) as store:
        return aio.run(run(store))


def cmd_restore_vm(args: argparse.Namespace) -> int:
    """``restore --config`` without ``--to``: the snapshot becomes a new VM on the engine
    (through the daemon when one answers, else ``engine.app.restore`` in this process)."""
    if args.config is None:
        raise ConfigError(message="restore: give --to PATH, or --config to restore a new VM")
    if args.image_format:
        raise ConfigError(message="restore: --format applies to --to PATH only")
    if args.disks_at_once is not None:
        raise ConfigError(
            message="restore: --disks-at-once applies to --to PATH only; into the engine, "
            "set limits.restore_disks in the configuration"
        )
    if args.disk and not args.into_vm:
        raise ConfigError(message="restore: --disk needs --to PATH or --into-vm VM")
    request = VmRestoreRequest(
        snapshot=args.snapshot,
        name=args.name,
        cluster=args.cluster,
        storage_domain=args.storage_domain,
        flow=args.flow,
        engine=args.engine,
        disk=args.disk,
        into_vm=args.into_vm,
    )
    if not args.direct and (socket := cli_service.daemon_socket(args.config)) is not None:
        body = {"snapshot": args.snapshot, "name": args.name, "cluster": args.cluster}
        body |= {"storage_domain": args.storage_domain, "flow": args.flow, "engine": args.engine}
        body |= {"disk": args.disk, "into_vm": args.into_vm}
        return aio.run(cli_service.submit_and_follow(socket, "/v1/restores", body))
    config = load_config(args.config, args.config.parent / "conf.d")

    async def run(store: Store) -> int:
        target = await job_store(store)
        try:
            plan = plan_vm_restore(target, request)
            with ProgressDisplay(f"restore {plan.manifest.vm_name}") as display:
                outcome = await restore_vm(config, target, plan, progress=display.update)
        finally:
            await target.pool.aclose()
        for stats in outcome.restore.disks:
            print(stats.summary())
        print(outcome.restore.summary())
        if outcome.vm is None:
            return EXIT_FAILED  # the plugin deleted what it created
        what = "disks attached to VM" if args.into_vm else "restored VM"
        print(f"{what} {outcome.vm.name} id {outcome.vm.id}")
        return EXIT_OK

    # Read-only, as a local restore (``commands.restore``): --direct runs beside the daemon.
    with open_store(args, writable=False) as store:
        return aio.run(run(store))
