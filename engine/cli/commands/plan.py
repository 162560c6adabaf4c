"""What ``tessera policies --show-selection NAME`` and ``tessera backup vm --dry-run`` run
(their options: ``engine.cli.service``, ``engine.cli.main``): ``engine.app.plan`` in this
process, with or without a running daemon — both only read the engine and the store.

Output, one block per VM::

    VM web01 (cluster Default, up): flow backup-api, consistency application
      read  web01_os          10.0 GiB  incremental
      skip  web01_lun         a lun disk (not an image in a storage domain): not backed up
      skip  web01_scratch     not selected (disks: web01_os)

``policies --show-selection --json``: one document (sizes in bytes). Exit 1 when a VM
would be refused (``require_quiesce``, a disk selection that takes none of its disks),
else 0.
"""

import argparse
import json
from dataclasses import asdict

from engine.app.plan import BackupPlan, SelectionPreview, plan_backup, preview_policy
from engine.app.requests import VmBackupRequest
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.config.loader import load as load_config
from engine.config.loader import load_all
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.sources.capabilities import VmPlan
from engine.util import aio

# How a disk the flow can read incrementally is read at each level.
LEVEL_READS = {
    "incremental": "incremental",
    "differential": "differential (changed since the last full)",
    "full": "full",
}


def cmd_show_selection(args: argparse.Namespace) -> int:
    """The VMs and disks policy ``args.show_selection`` would take now (module docstring)."""
    loaded = load_all(args.config)
    policy = next((p for p in loaded.policies if p.name == args.show_selection), None)
    if policy is None:
        known = ", ".join(p.name for p in loaded.policies) or "none"
        raise ConfigError(message=f"no policy {args.show_selection!r} (policies: {known})")
    preview = aio.run(preview_policy(loaded.config, policy))
    if args.json:
        print(json.dumps(asdict(preview), indent=2))
    else:
        _print_preview(preview)
    return EXIT_FAILED if any(vm.problem for vm in preview.vms) else EXIT_OK


def _print_preview(preview: SelectionPreview) -> None:
    print(
        f"policy {preview.policy}: {len(preview.vms)} of the {preview.listed} VMs of "
        f"engine {preview.engine}"
    )
    if not preview.vms:
        print("  the selection matches none of them (a run would warn)")
    for vm in preview.vms:
        _print_vm(vm, "")


def _print_vm(vm: VmPlan, extra: str, level: str = "incremental") -> None:
    where = ", ".join(x for x in (f"cluster {vm.cluster}" if vm.cluster else "", vm.status) if x)
    print(f"VM {vm.vm_name} ({where}): flow {vm.flow}{extra}, consistency {vm.consistency}")
    width = max((len(d.name) for d in vm.disks), default=0)
    width = max([width, *(len(name) for name, _ in vm.skipped)])
    for d in vm.disks:
        read = d.read if d.read != "incremental" else LEVEL_READS[level]
        print(f"  read  {d.name:<{width}}  {human_bytes(d.size):>10}  {read}")
    for name, why in vm.skipped:
        print(f"  skip  {name:<{width}}  {why}")
    if not vm.disks:
        print("  no disk to read")
    if vm.problem:
        print(f"  REFUSED: {vm.problem}")


def cmd_backup_dry_run(args: argparse.Namespace) -> int:
    """``backup vm --dry-run``: the VMs, disks, flow, level and store resolved and checked;
    nothing read, written or created (module docstring)."""
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
    config = load_config(args.config, args.config.parent / "conf.d")
    with open_store(args, writable=False) as store:
        plans = aio.run(plan_backup(config, store, request))
        where = str(store.path)
        counts = {p.vm.vm_id: len(store.snapshots(p.vm.vm_id)) for p in plans}
    print("dry run: nothing was read, written or created")
    for plan in plans:
        _print_plan(plan, where, counts[plan.vm.vm_id])
    return EXIT_FAILED if any(p.vm.problem for p in plans) else EXIT_OK


def _print_plan(plan: BackupPlan, store: str, snapshots: int) -> None:
    level = f", level {plan.level}"
    if plan.parent:
        level += f" from parent {plan.parent}"
    _print_vm(plan.vm, level, plan.level)
    if plan.note:
        print(f"  note: {plan.note}")
    if not plan.vm.problem:
        print(f"  would add a snapshot to store {store} (it holds {snapshots} of this VM)")
