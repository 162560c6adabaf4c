"""A real engine cancels an image transfer whose imageio ticket sits idle past its
``inactivity_timeout`` (the lab's monitor does it too, ``Faults.inactivity_timeout`` shortening
the 60 s), and a transfer in an end or stuck phase never moves again for a client.

- A two-disk VM whose first disk reads slower than the inactivity timeout (throttled storage,
  ``Faults.storage_iops``) backs up and restores identically in the backup-API and the
  snapshot flows: each disk's transfer exists only while that disk is read. The attach flow
  (LAN free) reads the DataMover's local devices, which the same slow storage serves: it makes
  no transfer, so a slow read cannot cost it one, and it too backs up and restores identically.
- ``wait_transfer`` / ``finalize_transfer`` raise at once on every end or stuck phase, naming
  the disk, the phase and the transfer (they used to wait 600 s on most of them); a transfer
  that stays in a phase a client waits through ends the wait at the timeout of the client's
  clock (``polling``), here a ``StepClock`` that runs 600 s in no real time.
"""

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from plugins.lab.engine.server import FakeEngine
from plugins.ovirt import transfers
from tests.integration.images import identical, reference
from tests.ovirt.clock import StepClock
from tests.ovirt.test_attach_flow import attach_lab
from tests.ovirt.test_backup_api_flow import lab, tessera
from tests.ovirt.test_faults import assert_clean

__all__ = ["lab"]  # the fixture, shared

Lab = tuple[FakeEngine, Path, dict[str, Path]]

IDLE = 1  # seconds: imageio's idle_time counts whole seconds; the monitor acts past it
IOPS = 8  # the first disk takes many times IDLE to read
# The attach flow reads whole devices (no extents): vm1_os is 160 MiB, ≥ 160 FUSE reads.
ATTACH_IOPS = 40
ATTACH_FIRST_READS = 160


@pytest.mark.integration
@pytest.mark.parametrize("flow_name", ["backup-api", "snapshot-imageio"])
async def test_slow_first_disk_does_not_lose_the_second(
    tmp_path: Path, lab: Lab, flow_name: str
) -> None:
    engine, config, images = lab
    engine.faults.inactivity_timeout = IDLE
    engine.faults.storage_iops = IOPS
    refs = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--config", config, "--level", "full", "--flow", flow_name
    )
    assert code == 0, out + err
    timed_out = [e for e in engine.activity.events if e.code in (1072, 1076, 1077)]
    assert not timed_out, timed_out
    _, transfers = await assert_clean(engine)
    assert transfers == ["finished_success", "finished_success"], transfers
    assert all(t.host_id for t in engine.activity.transfers.values())

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    (snap,) = json.loads(out)
    restored = tmp_path / "restored"
    restored.mkdir()
    code, out, err = await tessera(
        "restore", snap["id"], "--store", tmp_path / "store", "--to", restored
    )
    assert code == 0, out + err
    for disk in snap["disks"]:
        assert identical(refs[disk["name"]], next(restored.glob(f"{disk['name']}.*")))


@pytest.mark.integration
async def test_slow_first_disk_in_the_attach_flow(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with attach_lab(tmp_path, tmp_path_factory) as lab:
        engine = lab.engine
        assert engine.devices is not None
        engine.faults.inactivity_timeout = IDLE
        engine.faults.storage_iops = ATTACH_IOPS
        refs = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in lab.images.items()}
        config = lab.config("config.yaml")
        throttled: dict[str, int] = {}

        async def watch() -> None:  # the devices the DataMover reads: on the slow storage?
            while True:
                for disk_id, device in list(engine.devices.plugged.items()):
                    throttled[disk_id] = getattr(device.nbd, "iops", 0)
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        try:
            code, out, err = await tessera(
                *("backup", "vm", "vm1", "--config", config, "--level", "full"),
                *("--flow", "snapshot-attach"),
            )
        finally:
            watcher.cancel()
        took = time.monotonic() - started
        assert code == 0, out + err
        assert len(throttled) == 2 and set(throttled.values()) == {ATTACH_IOPS}, throttled
        # The first disk alone is ATTACH_FIRST_READS requests at least (FUSE reads ≤ 1 MiB).
        assert took > ATTACH_FIRST_READS / ATTACH_IOPS > IDLE * 2, took
        # No transfer made, so none cancelled: the slow read cost the flow nothing.
        assert engine.activity.transfers == {}
        timed_out = [e for e in engine.activity.events if e.code in (1072, 1076, 1077)]
        assert not timed_out, timed_out
        await lab.clean()

        code, out, _ = await tessera("snapshots", "--config", config, "--json")
        (snap,) = json.loads(out)
        assert {d["attributes"]["transport"] for d in snap["disks"]} == {"attach"}
        restored = tmp_path / "restored"
        restored.mkdir()
        code, out, err = await tessera(
            "restore", snap["id"], "--store", tmp_path / "store", "--to", restored
        )
        assert code == 0, out + err
        assert {d["name"] for d in snap["disks"]} == set(refs)
        for disk in snap["disks"]:
            assert identical(refs[disk["name"]], next(restored.glob(f"{disk['name']}.*")))


class _Transfer:
    def __init__(self, phase: str) -> None:
        from ovirtsdk4 import types

        self.id = "T-1"
        self.phase = types.ImageTransferPhase(phase)


class _Client:
    """An ``EngineClient`` stand-in whose transfer sits in ``phase`` until cancelled (then
    ``finished_cleanup``, as the engine ends a cancel)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.calls: list[str] = []
        self.clock = StepClock()

    async def call(self, fn: Any, what: str, obj: str = "", idempotent: bool = True) -> Any:
        self.calls.append(what)
        if what == "list events":
            return "Transfer T-1 was stopped"
        if what == "cancel image transfer":
            self.phase = "finished_cleanup"
            return True
        if what == "finalize image transfer":
            return False  # the engine: already ended
        if what == "poll image transfer" and fn.__name__ == "phase":
            return self.phase
        return _Transfer(self.phase)


END_PHASES = [
    "paused_system",
    "paused_user",
    "cancelled_system",
    "cancelled_user",
    "finalizing_failure",
    "finished_failure",
    "finalizing_cleanup",
    "finished_cleanup",
]


@pytest.mark.parametrize("phase", END_PHASES)
async def test_wait_transfer_ends_at_once_on_an_end_phase(phase: str) -> None:
    client = _Client(phase)
    async with asyncio.timeout(30):  # the old code waited READY_TIMEOUT (600 s)
        with pytest.raises(transfers.OvirtTransferError) as e:
            await transfers.wait_transfer(
                client,  # type: ignore[arg-type]
                _Transfer(phase),
                "VM vm1: backup B: disk vm1_data",
            )
    text = str(e.value)
    assert "disk vm1_data" in text and phase in text and "T-1" in text, text
    assert client.clock.slept == 0  # raised at the first read, never waited


@pytest.mark.parametrize("phase", [p for p in END_PHASES if p != "finished_success"])
async def test_finalize_transfer_ends_at_once_on_an_end_phase(phase: str) -> None:
    client = _Client(phase)
    async with asyncio.timeout(30):  # the old code waited FINALIZE_TIMEOUT on most
        with pytest.raises(transfers.OvirtTransferError) as e:
            await transfers.finalize_transfer(
                client,  # type: ignore[arg-type]
                "T-1",
                what="disk vm1_data",
            )
    text = str(e.value)
    assert "disk vm1_data" in text and phase in text and "T-1" in text, text
    assert client.clock.slept == 0  # raised at the first read, never waited


async def test_a_transfer_that_never_starts_times_out_on_the_clients_clock() -> None:
    client = _Client("initializing")
    async with asyncio.timeout(30):  # 600 s on the client's clock, none in real time
        with pytest.raises(transfers.OvirtTransferError) as e:
            await transfers.wait_transfer(
                client,  # type: ignore[arg-type]
                _Transfer("initializing"),
                "VM vm1: backup B: disk vm1_data",
            )
    assert "never started (still initializing)" in str(e.value)
    assert "cancel image transfer" in client.calls  # nothing is left open
    assert transfers.READY_TIMEOUT <= client.clock.now < transfers.READY_TIMEOUT + 1


async def test_a_finalize_that_never_ends_times_out_on_the_clients_clock() -> None:
    client = _Client("finalizing_success")
    async with asyncio.timeout(30):
        with pytest.raises(transfers.OvirtTransferError) as e:
            await transfers.finalize_transfer(
                client,  # type: ignore[arg-type]
                "T-1",
                what="disk vm1_data",
            )
    assert "still finalizing_success" in str(e.value)
    assert transfers.FINALIZE_TIMEOUT <= client.clock.now < transfers.FINALIZE_TIMEOUT + 1
