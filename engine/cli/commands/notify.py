"""What ``tessera notify test`` runs (its options: ``engine.cli.notify``): a test message to
each target the daemon's configuration names, each result printed."""

import argparse
import asyncio
import json
import socket
import sys
from datetime import UTC, datetime

from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.config.loader import LoadedConfig, load_all
from engine.core.errors import ConfigError
from engine.obs.summary import DOC_VERSION, Delivery, Notice


def cmd_notify_test(args: argparse.Namespace) -> int:
    loaded = load_all(args.config, policies_dir=args.policies_dir)
    results = asyncio.run(send_tests(loaded, args))
    if not results:
        print(
            "tessera: nothing to test: no addresses with an smtp section and no webhooks "
            "in the configuration (or all left out)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    for result in results:
        if args.json:
            doc = {"target": result.target, "ok": result.ok, "detail": result.detail}
            print(json.dumps(doc))
        else:
            print(f"{result.target}: {'ok' if result.ok else 'FAILED'} ({result.detail})")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def addresses(loaded: LoadedConfig) -> list[str]:
    """Every address the policies and maintenance name, each once, in order."""
    found = [a for p in loaded.policies for a in p.notifications.to]
    return list(dict.fromkeys([*found, *loaded.config.maintenance.notify]))


async def send_tests(loaded: LoadedConfig, args: argparse.Namespace) -> list[Delivery]:
    """One test message per address (a mail each, so each result is its own) and one call
    per webhook, one after the other, each bounded by its sender's timeout."""
    # Here, not at the top: aiosmtplib and aiohttp load only for this command (issue 15).
    from engine.obs.notify import Notifier  # noqa: PLC0415
    from engine.obs.webhook import WebhookSender  # noqa: PLC0415

    config = loaded.config
    now = datetime.now(UTC)
    results: list[Delivery] = []
    to = [] if args.no_mail else (args.to or addresses(loaded))
    if to and config.smtp is None:
        raise ConfigError(message=f"{args.config}: no smtp section: no mail can be sent")
    if to and config.smtp is not None:
        notifier = Notifier(config.smtp)
        for address in to:
            results.append(await notifier.send_test(address, now))
    hooks = [] if args.no_webhooks else [config.webhook(n) for n in args.webhook or ()]
    if not args.no_webhooks and not args.webhook:
        hooks = list(config.webhooks)
    for hook in hooks:
        results.append(await WebhookSender(hook).send(test_notice(now)))
    return results


def test_notice(now: datetime) -> Notice:
    host = socket.gethostname()
    title = f"Tessera test notification from {host}"
    text = f"Sent {now.isoformat(timespec='seconds')} by `tessera notify test`."
    document = {"type": "tessera.test", "version": DOC_VERSION, "event": "test"}
    document |= {"title": title, "host": host, "time": now.isoformat()}
    return Notice("test", title, (("Host", host),), (text,), text, document)
