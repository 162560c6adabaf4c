"""What ``tessera check-config`` and ``tessera show-config`` run (their options:
``engine.cli.config``)."""

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any

import msgspec
import yaml

from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.times import human_time
from engine.config.loader import LoadedConfig, check_all, load_all
from engine.config.policy import Policy
from engine.config.types import enc_hook
from engine.sched.calendar import next_after
from engine.sources.capabilities import FAILED, OK, SKIPPED

if TYPE_CHECKING:
    from engine.sources.capabilities import Check


def cmd_check_config(args: argparse.Namespace) -> int:
    """The summary, or the errors (exit 1); ``--deep``: each item tried. ``--json``: one
    document for monitoring, ``{"ok", "files", "errors", "checks": [{item, status, detail,
    hint}]}`` (checks only with ``--deep``), the same exit status."""
    loaded, errors = check_all(args.config, policies_dir=args.policies_dir)
    if loaded is None:
        if args.json:
            doc = {"ok": False, "files": [], "errors": [str(e) for e in errors], "checks": []}
            print(json.dumps(doc, indent=2))
            return EXIT_FAILED
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{len(errors)} error{'s' if len(errors) != 1 else ''}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        for line in summary(loaded, datetime.now(UTC)):
            print(line)
    checks: list[Check] = []
    if args.deep:
        # Here, not at the top: the checks' plugins, SMTP and TLS load for --deep only.
        from engine.app.doctor import deep_check  # noqa: PLC0415

        checks = asyncio.run(deep_check(loaded))
        if not args.json:
            for line in check_lines(checks):
                print(line, flush=True)
    ok = not any(c.status == FAILED for c in checks)
    if args.json:
        doc = {
            "ok": ok,
            "files": [str(f) for f in loaded.config_files],
            "errors": [],
            "checks": [
                {"item": c.item, "status": c.status, "detail": c.detail, "hint": c.hint}
                for c in checks
            ],
        }
        print(json.dumps(doc, indent=2))
    return EXIT_OK if ok else EXIT_FAILED


def check_lines(checks: "list[Check]") -> list[str]:
    """``--deep``'s report: a line per item (status, item, detail), a hint under a failure,
    then the counts."""
    lines = ["deep check:"]
    for check in checks:
        lines.append(f"  {check.status:<7} {check.item}: {check.detail}")
        if check.hint and check.status == FAILED:
            lines.append(f"          hint: {check.hint}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, FAILED, SKIPPED)}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
    return lines


def summary(loaded: LoadedConfig, now: datetime) -> list[str]:
    """The lines ``check-config`` prints for a valid configuration."""
    config = loaded.config
    zone = scheduler_zone(loaded)
    drop_ins = len(loaded.config_files) - 1
    lines = [
        f"OK: {loaded.config_files[0]}"
        + (f" (+ {drop_ins} drop-in{'s' if drop_ins != 1 else ''})" if drop_ins else "")
        + f", {len(loaded.policies)} polic{'ies' if len(loaded.policies) != 1 else 'y'}"
        f" in {loaded.policies_dir}",
        "  stores:  " + (", ".join(s.name for s in config.stores) or "none"),
        "  engines: " + (", ".join(e.name for e in config.engines) or "none"),
        "  peers:   " + (", ".join(p.name for p in config.peers) or "none"),
        f"  api:     {config.api.socket}"
        + (f", tcp {config.api.tcp.listen}" if config.api.tcp else ""),
        f"  time zone {getattr(zone, 'key', str(zone))}, misfire grace "
        f"{config.scheduler.misfire_grace}",
    ]
    for policy in loaded.policies:
        lines.append(f"  policy {policy.name}: {_policy_line(policy, now, zone)}")
    return lines


def _policy_line(policy: Policy, now: datetime, zone: tzinfo) -> str:
    if not policy.enabled:
        when = "disabled"
    elif not policy.schedule:
        when = "no schedule (runs by hand)"
    else:
        nxt = next_after(policy.calendars, now, zone)
        when = "; ".join(policy.schedule) + (
            f"; next {human_time(nxt, zone)}" if nxt else "; no future run"
        )
    level: str = policy.level.default
    if policy.level.full_every is not None:
        level += f", full every {policy.level.full_every}"
    if policy.level.full_on:
        level += f", full on {','.join(policy.level.full_on)}"
    return f"{when}; {level}"


def scheduler_zone(loaded: LoadedConfig) -> tzinfo:
    """The configured zone, else the host's."""
    zone = loaded.config.scheduler.timezone
    if zone is not None:
        return zone
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else UTC


def effective(loaded: LoadedConfig) -> dict[str, Any]:
    """The merged configuration and the policies as plain data (paths as text)."""
    doc: dict[str, Any] = msgspec.to_builtins(loaded.config, enc_hook=enc_hook)
    doc["policies_dir"] = str(loaded.policies_dir)
    doc["policies"] = [
        {"file": str(loaded.policy_files[p.name]), **msgspec.to_builtins(p, enc_hook=enc_hook)}
        for p in loaded.policies
    ]
    return {"files": [str(f) for f in loaded.config_files], **doc}


def cmd_show_config(args: argparse.Namespace) -> int:
    doc = effective(load_all(args.config, policies_dir=args.policies_dir))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False), end="")
    return EXIT_OK
