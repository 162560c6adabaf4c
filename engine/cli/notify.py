"""``tessera notify test``: its options. What it runs is ``engine.cli.commands.notify``.

Registered by ``engine.cli.main.build_parser`` through ``register``.
"""

import argparse
from pathlib import Path

from engine.cli.commands import Handler

EXAMPLES = """\
examples:
  tessera notify test                               every address and webhook the config names
  tessera notify test --to ops@example.org          one address
  tessera notify test --webhook ops-chat --no-mail  one webhook, no mail
"""


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]", default_config: Path
) -> None:
    """Add ``notify test`` to the parser."""
    group = sub.add_parser(
        "notify",
        help="notifications: send a test",
        description="Notifications the daemon sends (digests per policy run, webhooks).",
    )
    commands = group.add_subparsers(dest="notify_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "test",
        help="send a test mail and call each webhook, through the daemon's configuration",
        description="Send a test message through the configuration's smtp section to every\n"
        "address the policies' notifications.to and maintenance.notify name, and call every\n"
        "webhook in it (each in its own format); print each target's result.\n"
        "Exit 0 when every target took its message, 1 when one did not or nothing is\n"
        "configured, 2 for a configuration error. The daemon need not run: the\n"
        "configuration is read here.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=default_config, help="the daemon config")
    p.add_argument(
        "--policies-dir", type=Path, help="policy directory (default: policies.d beside it)"
    )
    p.add_argument(
        "--to",
        action="append",
        metavar="ADDRESS",
        help="mail only this address (repeatable) instead of those the configuration names",
    )
    p.add_argument(
        "--webhook",
        action="append",
        metavar="NAME",
        help="call only this webhook (repeatable) instead of all of them",
    )
    p.add_argument("--no-mail", action="store_true", help="send no mail")
    p.add_argument("--no-webhooks", action="store_true", help="call no webhook")
    p.add_argument("--json", action="store_true", help="one JSON object per target")
    p.set_defaults(func=Handler("notify", "cmd_notify_test"))
