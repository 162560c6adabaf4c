"""``tessera run`` (the daemon) and the operator commands that talk to it over its API:
``vms``, ``policies`` (but ``--show-selection`` asks the engine itself:
``engine.cli.commands.plan``), ``jobs``, ``job ID [--follow]``, ``replication``, ``cancel
ID``: their options. What they run is ``engine.cli.commands.service``.

Registered by ``engine.cli.main.build_parser`` through ``register``.
"""

import argparse
from pathlib import Path

from engine.cli import args as cli_args
from engine.cli.commands import Handler


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]", default_config: Path
) -> None:
    p = sub.add_parser("run", help="run the DataMover service (systemd starts this)")
    p.add_argument("--config", type=Path, default=default_config)
    p.add_argument(
        "--grace",
        type=cli_args.non_negative_seconds,
        default=300.0,
        help="seconds running jobs get to finish after SIGTERM (a second SIGTERM cancels)",
    )
    p.set_defaults(func=Handler("service", "cmd_run"))

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", type=Path, default=default_config)
        p.add_argument("--socket", type=Path, help="the daemon's API socket (default: config)")
        p.add_argument("--json", action="store_true")
        return p

    p = client_parser("vms", "VMs of the engine, as the daemon sees them")
    p.add_argument("--engine", help="only this engine's VMs (its name in the configuration)")
    p.set_defaults(func=Handler("service", "cmd_vms"))
    p = client_parser("policies", "policies with their schedule and next run")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", metavar="NAME", help="run this policy now")
    what.add_argument(
        "--show-selection",
        metavar="NAME",
        help="the VMs and disks this policy would back up now and the flow of each, and "
        "the disks it would skip with the reason, asked of the engine (no daemon needed; "
        "nothing is created)",
    )
    p.set_defaults(func=Handler("service", "cmd_policies"))
    p = client_parser("jobs", "running and recent jobs (kept across daemon restarts)")
    p.add_argument("--running", action="store_true", help="only the running ones")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="running jobs and those that ended since WHEN: a duration back from now (24h, "
        "7d) or an ISO time",
    )
    p.add_argument("--failed", action="store_true", help="only finished jobs that did not succeed")
    p.set_defaults(func=Handler("service", "cmd_jobs"))
    p = client_parser("job", "one job: state, per-disk progress, log")
    p.add_argument("job_id", metavar="ID", help="the job's id (tessera jobs lists them)")
    p.add_argument("--follow", action="store_true", help="live progress until the job ends")
    p.set_defaults(func=Handler("service", "cmd_job"))
    p = client_parser("replication", "what was replicated to each peer, per VM")
    p.set_defaults(func=Handler("service", "cmd_replication"))
    p = client_parser("cancel", "cancel a running job (it cleans up first)")
    p.add_argument("job_id", metavar="ID", help="the job's id (tessera jobs lists them)")
    p.set_defaults(func=Handler("service", "cmd_cancel"))
