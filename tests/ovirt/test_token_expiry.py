"""SSO tokens expire, as the engine's sessions do, and Tessera outlives them.

The lab's ``Sessions`` take a clock; the tests move it instead of sleeping: past the idle
timeout (a daemon idle for days), or one tick per token check with a short lifetime (a
backup whose every few requests meet an expired token).
"""

import asyncio
import json
import os
import ssl
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import ovirtsdk4 as sdk
import pytest

from engine.core.units import MiB
from plugins.lab.disks import DiskRequest
from plugins.lab.engine import FakeEngine, demo_seed, sso
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt.client import MAX_API_CALLS, EngineClient, EngineConfig
from tests.integration.images import identical, reference
from tests.lab_disks import build_once

ROOT = Path(__file__).resolve().parents[2]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking:
    """Moves ``step`` seconds at every reading: each token check ages every token."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(demo_seed(), tmp_path) as fake:
        yield fake


def config(engine: FakeEngine, tmp_path: Path) -> EngineConfig:
    password_file = tmp_path / "engine.password"
    password_file.write_text(engine.password + "\n")
    return EngineConfig(
        engine.url, engine.username, password_file, ca_file=engine.ca_file, request_timeout=10
    )


def test_sessions_expire_when_idle_and_at_their_hard_limit() -> None:
    clock = ManualClock()
    sessions = sso.Sessions("u", "p", idle_timeout=10, lifetime=25, clock=clock)
    token = sessions.login("u", "p")
    assert token is not None
    for _ in range(2):
        clock.now += 9  # each use restarts the idle time
        assert sessions.user(token) == "u"
    clock.now += 10
    assert sessions.user(token) is None  # idle too long
    assert sessions.user(token) is None  # and gone for good
    token = sessions.login("u", "p")
    assert token is not None
    for _ in range(3):
        clock.now += 8
        assert sessions.user(token) == "u"
    clock.now += 1  # 25 s after login: busy or not, it ends
    assert sessions.user(token) is None
    assert sessions.expired == 2
    assert (sso.IDLE_TIMEOUT, sso.LIFETIME) == (1800, 36000)  # the engine's defaults


async def test_an_expired_token_gets_401_and_the_sdk_logs_in_again(engine: FakeEngine) -> None:
    clock = ManualClock()
    engine.sessions.clock = clock
    conn = sdk.Connection(
        url=engine.url,
        username=engine.username,
        password=engine.password,
        ca_file=str(engine.ca_file),
    )
    try:
        first = await asyncio.to_thread(conn.authenticate)
        clock.now += sso.IDLE_TIMEOUT
        context = ssl.create_default_context(cafile=engine.ca_file)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http,
            http.get(engine.url, headers={"Authorization": f"Bearer {first}"}) as resp,
        ):
            assert resp.status == 401
            assert resp.content_type == "application/xml"
        assert await asyncio.to_thread(conn.test, True)
        assert await asyncio.to_thread(conn.authenticate) != first
        assert engine.sessions.expired == 1
    finally:
        await asyncio.to_thread(conn.close)


async def test_a_client_idle_for_days_calls_again_and_shares_the_new_token(
    engine: FakeEngine, tmp_path: Path
) -> None:
    clock = ManualClock()
    engine.sessions.clock = clock
    async with EngineClient(config(engine, tmp_path)) as client:
        await client.test()
        assert len(engine.sessions) == 1
        clock.now += 3 * 24 * 3600  # the daemon sat idle over a long weekend
        assert await client.test() == "4.5.7-tessera-lab"
        assert engine.sessions.expired == 1
        # Threads opened now start from the renewed token: no 401, no further logins.
        barrier = threading.Barrier(MAX_API_CALLS)

        def probe(conn: sdk.Connection) -> str:
            barrier.wait(timeout=20)
            return str(conn.system_service().get().product_info.name)

        await asyncio.gather(*(client.call(probe, f"probe {i}") for i in range(MAX_API_CALLS)))
        assert engine.sessions.expired == 1
        assert len(engine.sessions) == 1
    assert len(engine.sessions) == 0  # close() logged the renewed token out


async def test_threads_opened_before_a_renewal_take_the_renewed_token(
    engine: FakeEngine, tmp_path: Path
) -> None:
    """Every worker thread has its connection (with the first token) when the token expires;
    one call renews it; the other threads then use the renewed token instead of each finding
    theirs expired and logging in once more (the engine would see one SSO session per
    thread)."""
    clock = ManualClock()
    engine.sessions.clock = clock
    async with EngineClient(config(engine, tmp_path)) as client:

        async def on_every_thread() -> None:
            barrier = threading.Barrier(MAX_API_CALLS)

            def probe(conn: sdk.Connection) -> str:
                barrier.wait(timeout=20)  # each call holds its own thread
                return str(conn.system_service().get().product_info.name)

            await asyncio.gather(*(client.call(probe, f"probe {i}") for i in range(MAX_API_CALLS)))

        await on_every_thread()
        assert len(engine.sessions) == 1
        clock.now += 3 * 24 * 3600
        await client.test()  # one thread finds the token expired and logs in again
        assert engine.sessions.expired == 1
        await on_every_thread()
        assert len(engine.sessions) == 1, "a thread logged in again with the expired token"
    assert len(engine.sessions) == 0


SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 128 * MiB, bootable=True),
                DiskSeed("vm1_data", 128 * MiB, format="raw", backup="none"),
            ),
        ),
    )
)


async def tessera(*args: str | Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli.main",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TESSERA_PASSPHRASE": "token-test"},
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.mark.integration
@pytest.mark.parametrize("flow", ["backup-api", "snapshot-imageio"])
async def test_a_backup_outlives_many_tokens(
    tmp_path: Path, flow: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Tokens live six token checks: every backup step meets expired tokens and goes on."""
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(SEED, engine_dir)
    disks = {d.alias: d for d in probe.inventory.disks.values()}
    images = {
        alias: tmp_path / f"{alias}.{'qcow2' if d.format == 'cow' else 'raw'}"
        for alias, d in disks.items()
    }
    requests = [
        DiskRequest(
            alias,
            path,
            "qcow2" if disks[alias].format == "cow" else "raw",
            disks[alias].provisioned_size,
            template=alias.endswith("_os"),
            vm="vm1",
        )
        for alias, path in images.items()
    ]
    await build_once(tmp_path_factory, requests)
    refs = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}
    async with (
        ImageioDaemon(base_dir=tmp_path) as daemon,
        FakeEngine(
            SEED,
            engine_dir,
            images={disks[a].id: p for a, p in images.items()},
            imageio=daemon,
            sso_lifetime=6,
        ) as engine,
    ):
        engine.sessions.clock = Ticking(1.0)
        (tmp_path / "engine-password").write_text(SEED.password + "\n")
        cfg = tmp_path / "config.yaml"
        cfg.write_text(
            "stores:\n"
            f"  - name: main\n    path: {tmp_path / 'store'}\n"
            "engines:\n"
            f"  - name: lab\n    url: {engine.url}\n    username: {SEED.username}\n"
            f"    password_file: {tmp_path / 'engine-password'}\n"
            f"    ca_file: {engine.ca_file}\n"
        )
        code, out = await tessera("store", "init", tmp_path / "store")
        assert code == 0, out
        code, out = await tessera(
            "backup", "vm", "vm1", "--config", cfg, "--level", "full", "--flow", flow
        )
        assert code == 0, out
        assert engine.sessions.expired >= 3, "the lifetime did not bite: the test proves nothing"
        code, out = await tessera("snapshots", "--config", cfg, "--json")
        assert code == 0, out
        snapshot = json.loads(out)[0]["id"]
        restored = tmp_path / "restored"
        restored.mkdir()
        code, out = await tessera(
            "restore", snapshot, "--store", tmp_path / "store", "--to", restored
        )
        assert code == 0, out
        for alias, ref in refs.items():
            assert identical(ref, next(restored.glob(f"{alias}.*"))), alias
