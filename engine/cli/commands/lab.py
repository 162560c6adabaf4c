"""What ``tessera lab up|show|down`` runs (its options: ``engine.cli.main``): the lab
plugin's own commands, found in the registry by name."""

import argparse
import json

from engine.cli.exits import EXIT_OK
from engine.sources import registry

LAB_KNOBS = {  # lab up option → the lab engine's Faults field
    "inactivity_timeout": "inactivity_timeout",
    "slow_reads": "storage_iops",
    "phase_seconds": "phase_seconds",
    "disk_seconds": "disk_seconds",
    "ticket_timeout": "ticket_timeout",
}


def cmd_lab(args: argparse.Namespace) -> int:
    action = registry.get("lab").command(args.lab_command)
    if args.lab_command == "up":
        knobs = {
            field: getattr(args, option)
            for option, field in LAB_KNOBS.items()
            if getattr(args, option) is not None
        }
        result = action(
            args.dir.resolve(),
            knobs,
            sso_idle_timeout=args.sso_idle_timeout,
            sso_lifetime=args.sso_lifetime,
        )
    else:
        result = action(args.dir.resolve())
    if args.lab_command == "down":
        print("lab stopped" if result else f"no lab was running in {args.dir}")
        return EXIT_OK
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    engine = result["engine"]
    print(f"engine   {engine['url']} (user {engine['username']}, CA {engine['ca_file']})")
    print(f"config   {args.dir.resolve() / 'tessera.yaml'}")
    for vm in result["vms"]:
        disks = ", ".join(f"{d['alias']} ({d['format']})" for d in vm["disks"])
        print(f"vm       {vm['name']:<20} {disks}")
    return EXIT_OK
