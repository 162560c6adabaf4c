"""``tessera check-config`` and ``tessera show-config``: their options. What they run is
``engine.cli.commands.config``.

Registered by ``engine.cli.main.build_parser`` through ``register``. Both read the daemon
config, its ``conf.d`` drop-ins and the policies. Nothing here reads a secret: the models
hold only the paths of secret files, so ``show-config`` prints paths, never contents.
"""

import argparse
from pathlib import Path

from engine.cli.commands import Handler


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]", default_config: Path
) -> None:
    """Add ``check-config`` and ``show-config`` to the parser."""
    p = sub.add_parser(
        "check-config",
        help="check the daemon configuration and the policies",
        description="Load config.yaml, conf.d/*.yaml and policies.d/*.yaml; print a "
        "summary, or every error with file, key and line (exit 1). With --deep, also try "
        "everything the configuration names (engines: reachable, CA, credentials, DataMover "
        "VM; stores: initialised and opened with their passphrase; smtp, syslog, webhooks: "
        "reachable; nothing is sent or written) and print each with ok, FAILED or skipped "
        "and a hint; exit 1 when one failed.",
    )
    _add_config_options(p, default_config)
    p.add_argument(
        "--deep",
        action="store_true",
        help="also try the engines, stores, smtp, syslog and webhooks for real",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON document (ok, files, errors, checks) for monitoring; same exit status",
    )
    p.set_defaults(func=Handler("config", "cmd_check_config"))

    p = sub.add_parser(
        "show-config",
        help="print the effective configuration (drop-ins merged) and the policies",
        description="Secrets are never printed: the configuration only holds their file paths.",
    )
    _add_config_options(p, default_config)
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=Handler("config", "cmd_show_config"))


def _add_config_options(p: argparse.ArgumentParser, default_config: Path) -> None:
    p.add_argument("--config", type=Path, default=default_config, help="the daemon config")
    p.add_argument(
        "--policies-dir", type=Path, help="policy directory (default: policies.d beside it)"
    )
