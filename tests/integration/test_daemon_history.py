"""Job history across a daemon restart: the jobs a daemon ran, ``tessera jobs`` (the API's
``/v1/jobs``, with ``since`` and ``failed``) and the ``/metrics`` last-success gauges are the
same after a stop and a new start on the same stores (``engine.jobs.history``).

The daemon runs in this process (``Service.run``) with its real stores, job manager and
maintenance jobs: a GC that succeeds and a verify that fails on a damaged chunk, then a stop
and a second daemon. A daemon SIGKILLed while a job runs is a subprocess (``tessera run``):
its job comes back as interrupted."""

import asyncio
import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.api.server import parse_since
from engine.daemon import maintenance
from engine.daemon.service import Service
from engine.jobs.history import INTERRUPTED
from engine.store.chunk_store import Store
from tests.daemon_setup import CHUNK, daemon_config, running
from tests.e2e.test_daemon import Daemon, get_text, tessera
from tests.helpers import realistic_bytes, write_snapshot
from tests.unit.maint.test_verify import flip, slot_id

pytestmark = pytest.mark.integration

PASSPHRASE = "history-test"


def make_config(tmp_path: Path) -> Path:
    return daemon_config(
        tmp_path,
        PASSPHRASE,
        'maintenance:\n  gc: "sun 03:00"\n  gc_grace: 1s\n  verify: "sat 04:00"\n'
        "  verify_percent: 100\n",
    )


async def run_task(service: Service, kind: str) -> None:
    (task,) = [t for t in maintenance.tasks(service.config.maintenance) if t.kind == kind]
    await maintenance.run_task(service, task)


def jobs_doc(service: Service, **query: Any) -> list[dict[str, Any]]:
    keep = ("id", "kind", "vm", "policy", "params", "state", "created", "started", "finished")
    return [
        {k: v for k, v in view.doc().items() if k in keep} | {"error": view.error}
        for view in service.jobs.jobs(**query)
    ]


def gauge(service: Service, name: str) -> list[str]:
    text = service.metrics.render()[0].decode()
    return sorted(line for line in text.splitlines() if line.startswith(name))


async def test_jobs_and_last_success_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    store = Store.open(tmp_path / "store", passphrase=PASSPHRASE.encode(), writable=True)
    with store:
        data = realistic_bytes(8 * CHUNK, seed=5)
        snapshot = write_snapshot(store, "vm-a", {"d": data})
        bad = slot_id(store, snapshot, 3)

    async with running(config) as first:
        await run_task(first, "gc")
        flip(first.stores["main"].store, bad)
        await run_task(first, "verify")
        before = jobs_doc(first)
        failed_before = jobs_doc(first, failed=True)
        last_before = gauge(first, "tessera_last_success_timestamp_seconds")
        summaries = {v.job_id: v.summary for v in first.jobs.jobs()}
    assert [(j["kind"], j["state"]) for j in before] == [("gc", "succeeded"), ("verify", "failed")]
    assert [j["kind"] for j in failed_before] == ["verify"]
    ((label, value),) = [line.split() for line in last_before]
    assert label == 'tessera_last_success_timestamp_seconds{vm="store:main"}'
    assert float(value) == datetime.fromisoformat(before[0]["finished"]).timestamp()

    async with running(config) as second:
        assert jobs_doc(second) == before
        assert jobs_doc(second, failed=True) == failed_before
        assert {v.job_id: v.summary for v in second.jobs.jobs()} == summaries
        assert gauge(second, "tessera_last_success_timestamp_seconds") == last_before
        later = datetime.fromisoformat(before[-1]["finished"]) + timedelta(seconds=1)
        assert jobs_doc(second, since=later) == []
        assert jobs_doc(second, since=parse_since("1h")) == before


def test_since_is_a_duration_or_an_iso_time() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("1d12h", now) == now - timedelta(hours=36)
    assert parse_since("2026-12-01T02:00:00", now) == datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    assert parse_since("2026-12-01T02:00:00+01:00", now).utcoffset() == timedelta(hours=1)
    with pytest.raises(Exception, match="give a duration"):
        parse_since("yesterday", now)


async def test_a_job_killed_with_its_daemon_is_in_the_history_as_interrupted(
    tmp_path: Path,
) -> None:
    """A daemon SIGKILLed in the middle of a GC job (by itself, at the GC's mark phase: the
    job is running then, whatever the machine's speed). The next daemon shows that job
    failed, interrupted, with its time range; the earlier GC's success stays the VM's last
    success in ``/metrics``."""
    config = make_config(tmp_path)
    store = Store.open(tmp_path / "store", passphrase=PASSPHRASE.encode(), writable=True)
    with store:
        write_snapshot(store, "vm-a", {"d": realistic_bytes(8 * CHUNK, seed=7)})
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        await daemon.start(kill_at=("gc.marked", 2))  # one hit per GC run: the second dies
        code, out = await tessera("gc", "--config", config)
        assert code == 0 and "gc succeeded" in out, out
        code, out = await tessera("gc", "--config", config)
        assert code != 0, out  # its daemon died under it
        assert daemon.proc is not None
        assert await asyncio.wait_for(daemon.proc.wait(), 120) == -signal.SIGKILL
        killed_at = datetime.now(UTC)

        await daemon.start()
        restarted = datetime.now(UTC)
        code, out = await tessera("jobs", "--config", config, "--json")
        assert code == 0, out
        ok, killed = sorted(json.loads(out), key=lambda j: j["created"])
        assert (ok["kind"], ok["state"], ok["error"]) == ("gc", "succeeded", None)
        assert (killed["kind"], killed["vm"], killed["state"]) == ("gc", "store:main", "failed")
        assert killed["error"].startswith(INTERRUPTED), killed
        started = datetime.fromisoformat(killed["started"])
        ended = datetime.fromisoformat(killed["finished"])
        assert datetime.fromisoformat(ok["finished"]) <= started <= ended <= killed_at
        assert killed["summary"]["interrupted"]["last_seen"] == killed["finished"]
        found = datetime.fromisoformat(killed["summary"]["interrupted"]["found_at_restart"])
        assert killed_at <= found + timedelta(seconds=1) and found <= restarted
        code, out = await tessera("jobs", "--config", config, "--json", "--failed")
        assert [j["id"] for j in json.loads(out)] == [killed["id"]], out
        (event,) = daemon.events("job.interrupted")
        assert (event["job"], event["state"]) == (killed["id"], "failed")

        text = await get_text(tmp_path / "api.sock", "/metrics")
        (line,) = [x for x in text.splitlines() if x.startswith("tessera_last_success_")]
        label, value = line.split()
        assert label == 'tessera_last_success_timestamp_seconds{vm="store:main"}'
        assert float(value) == datetime.fromisoformat(ok["finished"]).timestamp()
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()

    await daemon.start()  # a third daemon: the interrupted row is an ordinary one now
    try:
        code, out = await tessera("jobs", "--config", config, "--json")
        assert [(j["id"], j["state"]) for j in json.loads(out)] == [
            (ok["id"], "succeeded"),
            (killed["id"], "failed"),
        ], out
        assert not daemon.events("job.interrupted")[1:]
        assert await daemon.stop() == 0
    finally:
        await daemon.kill()
