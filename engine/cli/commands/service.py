"""What ``tessera run`` and the commands that talk to a running daemon run (their options:
``engine.cli.service``); plus ``submit_and_follow``, which ``backup vm``, ``restore --config``
and ``gc --config`` use when a daemon runs, and ``daemon_socket``, which finds out.

Human tables by default, ``--json`` for scripts.
"""

import argparse
import asyncio
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.cli.progress import ProgressDisplay
from engine.cli.times import human_time
from engine.config.loader import load, load_all
from engine.core.units import human_bytes
from engine.obs.log import configure as configure_logging
from engine.util import aio

if TYPE_CHECKING:
    from engine.cli.client import ApiClient

FOLLOW_INTERVAL: Final = 0.5  # seconds between progress polls
FINAL: Final = ("succeeded", "failed", "cancelled", "aborted")


def _client(socket: Path) -> "ApiClient":
    """The daemon's API client; aiohttp is loaded only by the commands that talk to it."""
    from engine.cli.client import ApiClient  # noqa: PLC0415 - a local command loads no HTTP

    return ApiClient(socket)


client = _client  # for the commands of other modules that talk to the daemon


def socket_of(args: argparse.Namespace) -> Path:
    if getattr(args, "socket", None) is not None:
        return Path(args.socket)
    return load(args.config, args.config.parent / "conf.d").api.socket


def cmd_run(args: argparse.Namespace) -> int:
    from engine.api.server import start_listeners  # noqa: PLC0415 - aiohttp server only here
    from engine.daemon.service import Service  # noqa: PLC0415

    loaded = load_all(args.config)
    section = loaded.config.logging
    level = getattr(logging, section.level.upper())
    forwarder = configure_logging(
        level, json=section.json, stream=sys.stdout, syslog=loaded.config.syslog
    )
    try:
        service = Service(loaded, grace=args.grace, loader=partial(load_all, args.config))
        if forwarder is not None:
            service.metrics.watch_counter(
                "tessera_syslog_dropped",
                "log lines the syslog server did not get",
                lambda: forwarder.dropped,
            )
        aio.run(service.run(start_listeners))
    finally:
        if forwarder is not None:
            forwarder.close()
    return EXIT_OK


async def _call(
    args: argparse.Namespace, method: str, path: str, body: Any = None, **q: Any
) -> Any:
    async with _client(socket_of(args)) as client:
        return await client.request(method, path, body, **q)


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def cmd_vms(args: argparse.Namespace) -> int:
    vms = aio.run(_call(args, "GET", "/v1/vms", engine=args.engine))
    if args.json:
        _print(vms)
        return EXIT_OK
    print(f"{'NAME':<24}  {'CLUSTER':<16}  {'STATUS':<10}  {'DISKS':>5}  TAGS")
    for vm in vms:
        print(
            f"{vm['name'][:24]:<24}  {(vm.get('cluster') or '-')[:16]:<16}  "
            f"{(vm.get('status') or '-'):<10}  {len(vm['disks']):>5}  {','.join(vm['tags'])}"
        )
    return EXIT_OK


def cmd_policies(args: argparse.Namespace) -> int:
    if args.show_selection:  # asks the engine itself, daemon or not
        from engine.cli.commands.plan import cmd_show_selection  # noqa: PLC0415

        return cmd_show_selection(args)
    if args.run:
        doc = aio.run(_call(args, "POST", f"/v1/policies/{args.run}/run"))
        if args.json:
            _print(doc)
        else:
            why = f" ({doc['reason']})" if doc["reason"] else ""
            print(f"policy {doc['policy']}: {doc['outcome']}{why}")
        return EXIT_OK if doc["outcome"] != "failed" else EXIT_FAILED
    docs = aio.run(_call(args, "GET", "/v1/policies"))
    if args.json:
        _print(docs)
        return EXIT_OK
    print(f"{'NAME':<20}  {'NEXT RUN':<25}  {'RUNNING':<8}  SCHEDULE")
    for p in docs:
        print(
            f"{p['name'][:20]:<20}  {(p['next_run'] or '-')[:25]:<25}  "
            f"{'yes' if p['running'] else '':<8}  {'; '.join(p['schedule']) or 'by hand'}"
        )
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    query = {"running": "1" if args.running else None, "since": args.since}
    query["failed"] = "1" if args.failed else None
    docs = aio.run(_call(args, "GET", "/v1/jobs", **query))
    if args.json:
        _print(docs)
        return EXIT_OK
    print(f"{'ID':<22}  {'KIND':<8}  {'VM':<24}  {'STATE':<10}  {'POLICY':<12}  PROGRESS")
    for j in docs:
        print(
            f"{j['id']:<22}  {j['kind']:<8}  {j['vm'][:24]:<24}  {j['state']:<10}  "
            f"{(j['policy'] or '-')[:12]:<12}  {_percent(j)}"
        )
    return EXIT_OK


def _percent(job: dict[str, Any]) -> str:
    done = sum(d["done"] for d in job["disks"].values())
    total = sum(d["total"] for d in job["disks"].values())
    return f"{100 * done / total:.0f}%" if total else "-"


def cmd_job(args: argparse.Namespace) -> int:
    if args.follow:
        return aio.run(follow(socket_of(args), [args.job_id], json_lines=args.json))
    doc = aio.run(_call(args, "GET", f"/v1/jobs/{args.job_id}"))
    if args.json:
        _print(doc)
        return EXIT_OK
    print(f"job {doc['id']}: {doc['kind']} of {doc['vm']} — {doc['state']}")
    for name, d in doc["disks"].items():
        print(f"  disk {name}: {human_bytes(d['done'])} of {human_bytes(d['total'])}")
    for line in doc.get("log", []):
        print(f"  {line}")
    if doc["error"]:
        print(f"  error: {doc['error']}")
    return EXIT_OK if doc["state"] not in {"failed", "cancelled", "aborted"} else EXIT_FAILED


def cmd_replication(args: argparse.Namespace) -> int:
    doc = aio.run(_call(args, "GET", "/v1/replication"))
    if args.json:
        _print(doc)
        return EXIT_OK
    print(f"{'STORE':<10}  {'PEER':<16}  {'VM':<36}  {'SNAPSHOT':<16}  REPLICATED")
    for peer in doc["peers"]:
        for vm, last in sorted(peer["vms"].items()):
            print(
                f"{peer['store'][:10]:<10}  {peer['peer'][:16]:<16}  {vm[:36]:<36}  "
                f"{last['snapshot']:<16}  {_when(last.get('replicated'))}"
            )
    for job in doc["running"]:
        print(f"running: {job['id']} {job['vm']} {_percent(job)}")
    return EXIT_OK


def _when(iso: str | None) -> str:
    return human_time(iso) if iso else "-"


def cmd_cancel(args: argparse.Namespace) -> int:
    doc = aio.run(_call(args, "POST", f"/v1/jobs/{args.job_id}/cancel"))
    print(f"job {doc['id']}: cancel requested (state {doc['state']})")
    return EXIT_OK


async def follow(socket: Path, job_ids: list[str], *, json_lines: bool = False) -> int:
    """Show live progress of the jobs until they all end; EXIT_FAILED if any did not
    succeed. Prints each job's new log lines as they come and its summary at the end.

    Ctrl-C stops the following, not the jobs: they run on in the daemon, and this says so,
    with the command that would cancel them (then ``main`` exits 130)."""
    failed = 0
    following = list(job_ids)
    try:
        async with _client(socket) as client:
            while following:
                failed += not await _follow_one(client, following[0], json_lines)
                following.pop(0)
    except asyncio.CancelledError:
        word = "keeps" if len(following) == 1 else "keep"
        print(
            f"\ntessera: stopped following; job {', '.join(following)} {word} running in the "
            f"daemon (`tessera cancel JOB_ID` with the same --config or --socket stops one)",
            file=sys.stderr,
        )
        raise
    return EXIT_FAILED if failed else EXIT_OK


async def _follow_one(client: "ApiClient", job_id: str, json_lines: bool) -> bool:
    """Follow one job until it ends; True if it succeeded."""
    seen = 0
    doc = await client.request("GET", f"/v1/jobs/{job_id}")
    with ProgressDisplay(f"{doc['kind']} {doc['vm']}") as display:
        while True:
            for line in doc.get("log", [])[seen:]:
                print(line if not json_lines else json.dumps({"log": line}), flush=True)
            seen = len(doc.get("log", []))
            for name, d in doc["disks"].items():
                display.update(name, d["done"], d["total"])
            if doc["state"] in FINAL:
                break
            await asyncio.sleep(FOLLOW_INTERVAL)
            doc = await client.request("GET", f"/v1/jobs/{job_id}")
    if json_lines:
        print(json.dumps(doc))
    return bool(doc["state"] == "succeeded")


async def submit_and_follow(socket: Path, path: str, body: dict[str, Any]) -> int:
    """POST a backup or restore to the daemon, then follow its jobs."""
    async with _client(socket) as client:
        doc = await client.request("POST", path, body)
    ids = [j["id"] for j in doc["jobs"]]
    for job_id in ids:
        print(f"job {job_id} submitted to the daemon", flush=True)  # a script sees it now
    return await follow(socket, ids)


def daemon_socket(config: Path) -> Path | None:
    """The daemon's socket if one answers there, else None (run the job in-process)."""
    try:
        socket = load(config, config.parent / "conf.d").api.socket
    except OSError:
        return None

    async def probe() -> bool:
        try:
            async with _client(socket) as client:
                return await client.available()
        except Exception:  # noqa: BLE001 - any failure to talk means "no daemon"
            return False

    return socket if socket.exists() and aio.run(probe()) else None
