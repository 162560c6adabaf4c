"""Scheduled maintenance in the daemon: GC and verify run as jobs on every store, beside
the policies' backups; a verify that finds damage fails its job, e-mails the findings to
``maintenance.notify`` (a real aiosmtpd server on loopback) and posts them to
``maintenance.webhooks`` (a real aiohttp server)."""

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.config.loader import load_all
from engine.daemon import maintenance
from engine.daemon.jobs import JobView
from engine.daemon.service import Service
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.sched.clock import FakeClock
from engine.store.chunk_store import Store
from tests.daemon_setup import CHUNK, daemon_config
from tests.helpers import realistic_bytes, write_snapshot
from tests.integration.test_smtp import Mailbox, smtp_server
from tests.integration.webhook_server import Receiver, hook_server
from tests.unit.maint.test_verify import flip, slot_id

pytestmark = pytest.mark.integration

PASSPHRASE = "maintenance-test"


def make_config(tmp_path: Path, smtp_port: int, hook_base: str) -> Path:
    return daemon_config(
        tmp_path,
        PASSPHRASE,
        'maintenance:\n  gc: "sun 03:00"\n  gc_grace: 1s\n  verify: "sat 04:00"\n'
        "  verify_percent: 100\n  notify: [ops@example.org]\n  webhooks: [store-alerts]\n"
        f"smtp:\n  host: 127.0.0.1\n  port: {smtp_port}\n  starttls: false\n"
        "  from: tessera@dm01.example.org\n"
        f"webhooks:\n  - {{name: store-alerts, url: '{hook_base}/alerts'}}\n",
    )


async def run(service: Service, kind: str) -> JobView:
    (task,) = [t for t in maintenance.tasks(service.config.maintenance) if t.kind == kind]
    before = {j.job_id for j in service.jobs.jobs()}
    await maintenance.run_task(service, task)
    # (not "the last one listed": two jobs started within a second sort by their random ids)
    (new,) = [j for j in service.jobs.jobs() if j.job_id not in before]
    return new


async def test_gc_and_verify_run_as_jobs_and_findings_are_mailed(tmp_path: Path) -> None:
    mailbox = Mailbox()
    receiver = Receiver()
    async with smtp_server(mailbox) as port, hook_server(receiver) as base:
        # The daemon's clock runs 2 s ahead of the prune below: its snapshot is past the 1 s
        # gc_grace without the test waiting.
        clock = FakeClock(datetime.now(UTC) + timedelta(seconds=2))
        service = Service(load_all(make_config(tmp_path, port, base)), clock=clock)
        handle = await service._open_store(service.config.stores[0])
        try:
            async with asyncio.TaskGroup() as tg:
                manager = tg.create_task(service.jobs.run())
                await asyncio.sleep(0)
                await exercise(service, handle.store, mailbox, receiver)
                service.jobs.close()
                await manager
        finally:
            await service._close_store(handle)


async def exercise(service: Service, store: Store, mailbox: Mailbox, receiver: Receiver) -> None:
    shared = realistic_bytes(6 * CHUNK, seed=3)
    old = write_snapshot(store, "vm-a", {"d": shared + os.urandom(6 * CHUNK)})
    new = write_snapshot(store, "vm-a", {"d": shared + os.urandom(6 * CHUNK)})
    assert prune(store, Rules(keep_last=1), vm="vm-a").removed == [old.snapshot_id]

    gc_job = await run(service, "gc")
    assert gc_job.state == "succeeded", gc_job.error
    assert gc_job.vm == "store:main"
    assert gc_job.summary["removed_expired"] == [old.snapshot_id]
    assert any("condemned" in line for line in gc_job.lines)

    clean = await run(service, "verify")
    assert clean.state == "succeeded" and clean.summary["findings"] == 0
    assert not mailbox.envelopes and not receiver.calls  # nothing to report

    bad = slot_id(store, new, 8)
    flip(store, bad)
    damaged = await run(service, "verify")
    assert damaged.state == "failed"
    assert damaged.summary["damaged"] == [new.snapshot_id]
    assert damaged.summary["integrity"] is True
    for _ in range(50):
        if mailbox.envelopes:
            break
        await asyncio.sleep(0.1)
    (envelope,) = mailbox.envelopes
    assert envelope.rcpt_tos == ["ops@example.org"]
    assert "verify" in mailbox.message()["Subject"].lower()
    await asyncio.wait_for(receiver.arrived.wait(), 10)  # posted after the mail went
    (call,) = receiver.calls
    assert (call.path, call.body["type"], call.body["event"]) == (
        "/alerts",
        "tessera.job",
        "integrity",
    )
    assert call.body["job"]["kind"] == "verify" and call.body["job"]["state"] == "failed"
    text = service.metrics.render()[0].decode()
    assert 'tessera_jobs_finished_total{kind="verify",state="failed"} 1.0' in text
