"""The lab engine's one clock (``plugins.lab.engine.clock``): a ``FakeClock`` moves only when
the test advances it, and then every task it wakes has finished its work before ``advance``
returns; the engine's background work, its phases and its SSO tokens all run on the clock
the engine was given."""

import asyncio
from pathlib import Path

import pytest
from ovirtsdk4 import types

from engine.core.units import MiB
from plugins.lab.engine import DiskSeed, FakeClock, FakeEngine, Seed, VmSeed, clock, lab_id
from tests.lab.polling import Client, Stepper

VM_ID = lab_id("vm", "vm1")
SEED = Seed(vms=(VmSeed("vm1", disks=(DiskSeed("vm1_os", MiB, "raw", backup="none"),)),))


async def test_time_stands_still_until_advanced() -> None:
    fake = FakeClock(start=10.0)
    woke: list[float] = []

    async def sleeper() -> None:
        await fake.sleep(1.0)
        woke.append(fake.now())

    task = asyncio.create_task(sleeper())
    for _ in range(100):
        await asyncio.sleep(0)
    await asyncio.to_thread(lambda: None)  # real time passes; the clock's does not
    assert fake.now() == 10.0 and not woke
    await fake.advance(0.5)
    assert fake.now() == 10.5 and not woke
    await fake.advance(0.5)
    assert woke == [11.0]
    await task
    with pytest.raises(ValueError, match="cannot go back"):
        await fake.advance(-1)


async def test_advance_wakes_in_order_and_waits_for_each_woken_task() -> None:
    """A woken task may await real work (a thread here, qemu and imageio in the monitor):
    ``advance`` returns only once it sleeps on the clock again, at each deadline in turn."""
    fake = FakeClock()
    seen: list[tuple[str, float]] = []

    async def ticker(name: str, period: float, rounds: int) -> None:
        for _ in range(rounds):
            await fake.sleep(period)
            await asyncio.to_thread(lambda: None)  # work beyond a few loop iterations
            seen.append((name, fake.now()))

    tasks = [
        asyncio.create_task(ticker("a", 0.25, 4)),
        asyncio.create_task(ticker("b", 0.4, 2)),
    ]
    await fake.advance(1.0)
    assert seen == [("a", 0.25), ("b", 0.4), ("a", 0.5), ("a", 0.75), ("b", 0.8), ("a", 1.0)]
    await asyncio.gather(*tasks)


async def test_a_cancelled_sleeper_is_skipped() -> None:
    fake = FakeClock()
    task = asyncio.create_task(fake.sleep(1.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.advance(2.0)
    assert fake.now() == 2.0


async def test_a_woken_task_that_never_sleeps_again_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(clock, "REST_TIMEOUT", 0.2)
    fake = FakeClock()
    stuck = asyncio.Event()

    async def hangs() -> None:
        await fake.sleep(1.0)
        await stuck.wait()

    task = asyncio.create_task(hangs(), name="stuck-look")
    with pytest.raises(RuntimeError, match=r"stuck-look woken at 1\.0 s did not sleep again"):
        await fake.advance(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_ages_compare_to_the_microsecond() -> None:
    assert 0.35 - 0.1 < 0.25  # why: binary floating point
    assert clock.elapsed(0.35, 0.1, 0.25)
    assert not clock.elapsed(0.35, 0.1, 0.26)


async def test_the_engine_runs_on_the_clock_it_was_given(tmp_path: Path) -> None:
    """Backups move one phase per phase step of the engine's clock, however often a client
    looks, and SSO tokens age on the same clock."""
    fake = FakeClock()
    async with FakeEngine(SEED, tmp_path, clock=fake, sso_idle_timeout=2) as engine:
        stepper = Stepper(fake, engine.faults, asyncio.get_running_loop())

        def backup(conn: Client) -> list[str]:
            backups = conn.system_service().vms_service().vm_service(VM_ID).backups_service()
            b = backups.add(types.Backup(disks=[types.Disk(id=lab_id("disk", "vm1_os"))]))
            service = backups.backup_service(b.id)
            seen = [str(service.get().phase.value) for _ in range(5)]  # no step: no move
            for _ in range(2):
                conn.step()
                seen.append(str(service.get().phase.value))
            service.finalize()
            seen.append(str(service.get().phase.value))
            for _ in range(2):  # hybrid (cluster level 4.7): one more step for its snapshot
                conn.step()
                seen.append(str(service.get().phase.value))
            return seen

        def run() -> list[str]:
            conn = Client(
                stepper.step,
                url=engine.url,
                username=engine.username,
                password=engine.password,
                ca_file=str(engine.ca_file),
            )
            try:
                return backup(conn)
            finally:
                conn.close()

        phases = await asyncio.to_thread(run)
        assert phases == [
            *["initializing"] * 5,
            "starting",
            "ready",
            "finalizing",
            "finalizing",
            "succeeded",
        ]
        assert fake.now() == 4 * engine.faults.phase_seconds

        token = engine.sessions.login(engine.username, engine.password)
        assert token is not None and engine.sessions.user(token) == engine.username
        await fake.advance(2.5)  # past the idle timeout, on the engine's clock
        assert engine.sessions.user(token) is None
