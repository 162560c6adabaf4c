"""What ``tessera prune``, ``tessera snapshots protect|unprotect|removed|unremove`` and
``tessera store status`` run (their options: ``engine.cli.maint``)."""

import argparse
import json
from datetime import tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.maint import KEEP_COUNTS
from engine.cli.times import WIDTH as TIME_WIDTH
from engine.cli.times import human_time
from engine.core.errors import ConfigError
from engine.core.units import human_bytes
from engine.maint.prune import PruneResult, prune, removed_snapshots, set_protected, unremove
from engine.maint.retention import Rules
from engine.maint.usage import StoreUsage, Usage, store_usage
from engine.store.chunk_store import Store
from engine.store.layout import Layout

# --- prune ---------------------------------------------------------------------------------


def rules_from_args(args: argparse.Namespace) -> Rules:
    rules = Rules(
        **{f"keep_{w}": getattr(args, f"keep_{w}") for w in KEEP_COUNTS},
        keep_within=args.keep_within,
    )
    try:
        rules.validate()
    except ValueError as e:
        raise ConfigError(message=f"prune: {e}") from None
    if rules.empty():
        raise ConfigError(
            message="prune: no keep rules given; refusing to remove every snapshot but the "
            "newest of each VM. Give at least one of --keep-last, --keep-hourly, "
            "--keep-daily, --keep-weekly, --keep-monthly, --keep-yearly, --keep-within"
        )
    return rules


def _zone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(message=f"prune: unknown time zone {name!r}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    rules = rules_from_args(args)
    tz = _zone(args.tz)
    with open_store(args, False) as store:
        if args.vm is not None and not store.snapshots(args.vm):
            raise ConfigError(message=f"prune: VM {args.vm} has no snapshots in {store.path}")
        result = prune(store, rules, vm=args.vm, tz=tz, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(prune_doc(result), indent=2))
    else:
        _print_prune(result, tz)
    return EXIT_FAILED if result.skipped else EXIT_OK


def prune_doc(result: PruneResult) -> dict[str, object]:
    return {
        "dry_run": result.dry_run,
        "rules": {k: v for k, v in _rules_dict(result.rules).items() if v},
        "decisions": [
            {
                "id": d.snapshot_id,
                "vm": {"id": d.vm_id, "name": d.vm_name},
                "time": d.time.isoformat(),
                "action": d.action,
                "reasons": list(d.reasons),
                **(
                    {"skipped": result.skipped[d.snapshot_id]}
                    if d.snapshot_id in result.skipped
                    else {}
                ),
                **(
                    {"locked": result.locked[d.snapshot_id]}
                    if d.snapshot_id in result.locked
                    else {}
                ),
            }
            for d in result.decisions
        ],
        "removed": result.removed,
        "skipped": result.skipped,
        "locked": result.locked,
        "notes": result.notes,
    }


def _rules_dict(rules: Rules) -> dict[str, object]:
    return {f: getattr(rules, f) for f in rules.__struct_fields__}


def _print_prune(result: PruneResult, tz: tzinfo | None) -> None:
    for note in result.notes:
        print(f"note: {note}")
    print(f"rules: {result.rules.describe()}")
    vm = None
    for d in result.decisions:
        if d.vm_id != vm:
            vm = d.vm_id
            print(f"VM {d.vm_name} ({d.vm_id})")
        action = d.action
        if d.snapshot_id in result.skipped:
            action = "skip"
        why = ", ".join(d.reasons)
        if d.snapshot_id in result.skipped:
            why += f" — not removed: {result.skipped[d.snapshot_id]}"
        if d.snapshot_id in result.locked:
            action = "locked"
            why += f" — kept: {result.locked[d.snapshot_id]}"
        print(f"  {action:<6}  {d.snapshot_id:<16}  {human_time(d.time, tz)}  {why}")
    n_remove, n_keep = len(result.to_remove), len(result.decisions) - len(result.to_remove)
    if result.dry_run:
        print(f"dry run: would remove {n_remove} snapshots, keep {n_keep}")
        return
    print(
        f"removed {len(result.removed)} snapshots, kept {n_keep}"
        + (f", {len(result.skipped)} could not be removed" if result.skipped else "")
        + (f", {len(result.locked)} kept by object lock" if result.locked else "")
        + "; their data is freed by the next GC after the grace period"
    )


# --- protect ---------------------------------------------------------------------------------


def cmd_protect(args: argparse.Namespace) -> int:
    protect = args.snapshots_command == "protect"
    with open_store(args, False) as store:
        sid = store.resolve(args.snapshot)
        changed = set_protected(store, sid, protect)
    state = "protected" if protect else "unprotected"
    print(f"snapshot {sid} {state}" if changed else f"snapshot {sid} was already {state}")
    return EXIT_OK


# --- the undo window: snapshots removed / unremove ------------------------------------------


def cmd_removed(args: argparse.Namespace) -> int:
    """List ``STORE/removed/`` without opening the store: it needs no key."""
    removed = removed_snapshots(Layout(args.store))
    if args.json:
        doc = [
            {
                "id": r.snapshot_id,
                "vm": r.vm_name,
                "removed_at": r.removed_at.isoformat() if r.removed_at else None,
            }
            for r in removed
        ]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"{'ID':<16}  {'REMOVED':<{TIME_WIDTH}}  VM")
    for r in removed:
        at = human_time(r.removed_at) if r.removed_at else "?"
        print(f"{r.snapshot_id:<16}  {at:<{TIME_WIDTH}}  {r.vm_name}")
    return EXIT_OK


def cmd_unremove(args: argparse.Namespace) -> int:
    with open_store(args, False) as store:
        ids = [r.snapshot_id for r in removed_snapshots(store.layout)]
        for prefix in args.snapshots:
            matches = [i for i in ids if i.startswith(prefix)]
            if len(matches) != 1:
                why = "matches several" if matches else "is not among the removed snapshots"
                raise ConfigError(
                    message=f"unremove: {prefix} {why} (tessera snapshots removed lists them)"
                )
            unremove(store, matches[0])
            print(f"snapshot {matches[0]} is back")
    return EXIT_OK


# --- store status ----------------------------------------------------------------------------


def cmd_store_status(args: argparse.Namespace) -> int:
    with open_store(args, False) as store:
        usage = store_usage(store)
        bucket = _bucket_line(store)
    if args.json:
        doc = usage.doc()
        if bucket is not None:
            doc["bucket"] = bucket
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    _print_status(usage, args.snapshots)
    if bucket is not None:
        budget = bucket["month_budget"] or "none"
        print(
            f"bucket     {bucket['where']}: {bucket['month_requests']} requests in "
            f"{bucket['month']} (UTC; budget {budget}), cache {human_bytes(bucket['cache_bytes'])}"
        )
    return EXIT_OK


def _bucket_line(store: Store) -> dict[str, Any] | None:
    """A store in a bucket: where, this month's requests and budget, the cache."""
    if store.remote is None or store.remote.objects.budget is None:
        return None
    budget = store.remote.objects.budget
    month, used = budget.used()
    return {
        "where": store.remote.where,
        "month": month,
        "month_requests": used,
        "month_budget": budget.per_month,
        "cache_bytes": store.remote.cached_bytes,
    }


_VM = 2 + 16 + 1 + TIME_WIDTH  # the VM column holds a snapshot's indented id, mark, time
_COLUMNS = ("LOGICAL", "DATA", "REFERENCED", "STORED", "UNIQUE", "SHARED", "FREES")


def _row(u: Usage) -> str:
    values = (
        u.logical_bytes,
        u.data_bytes,
        u.referenced_bytes,
        u.stored_bytes,
        u.unique_bytes,
        u.shared_bytes,
        u.frees_bytes,
    )
    return "  ".join(f"{human_bytes(v):>10}" for v in values)


def _print_status(usage: StoreUsage, per_snapshot: bool) -> None:
    t = usage.total
    h = human_bytes
    print(f"store      {usage.path}")
    print(f"snapshots  {t.snapshots} ({usage.removed_snapshots} removed, in the grace period)")
    print(f"logical    {h(t.logical_bytes)} of virtual disks, {h(t.data_bytes)} of data")
    print(f"referenced {t.chunks} chunks, {h(t.referenced_bytes)}, stored as {h(t.stored_bytes)}")
    print(
        f"index      {usage.index_chunks} chunks, {h(usage.index_stored_bytes)} of records "
        f"in {h(usage.pack_bytes)} of packs"
    )
    print(
        f"garbage    {usage.unreferenced_chunks} chunks, {h(usage.unreferenced_bytes)} "
        "referenced by no snapshot (freed by GC)"
    )
    if t.missing_chunks:
        print(f"missing    {t.missing_chunks} referenced chunks are not indexed: run store verify")
    if not usage.vms:
        return
    print()
    header = "  ".join(f"{c:>10}" for c in _COLUMNS)
    print(f"{'VM':<{_VM}}  {'SNAPS':>5}  {header}")
    for vm in usage.vms:
        print(f"{vm.vm_name[:_VM]:<{_VM}}  {vm.usage.snapshots:>5}  {_row(vm.usage)}")
        if per_snapshot:  # the time as in `tessera snapshots`; P marks a protected one
            for s in vm.snapshots:
                mark = "P" if s.protected else " "
                print(f"  {s.snapshot_id:<16}{mark}{human_time(s.time)}  {'':>5}  {_row(s.usage)}")
