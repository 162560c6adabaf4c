"""``EngineClient`` against the lab's fake engine, driven by the real ``ovirtsdk4``.

No test sleeps: retries get an injected ``sleep`` that only records the delays, and the
concurrency test makes its calls meet at a ``threading.Barrier`` instead of timing them.
"""

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

from engine.core.errors import ConfigError, TransientError
from engine.util.retry import RetryPolicy
from plugins.lab.engine import FakeEngine, demo_seed, lab_id
from plugins.lab.tls import LabCa
from plugins.ovirt.client import (
    MAX_API_CALLS,
    EngineApiError,
    EngineAuthError,
    EngineClient,
    EngineConfig,
    EngineNotFound,
    EngineTlsError,
    EngineUnavailable,
    _is_transient,
)

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.001)


class Sleeps:
    """An injected sleep that records what it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(demo_seed(), tmp_path) as fake:
        yield fake


def make_config(engine: FakeEngine, tmp_path: Path, password: str | None = None) -> EngineConfig:
    password_file = tmp_path / "engine.password"
    password_file.write_text((engine.password if password is None else password) + "\n")
    return EngineConfig(
        url=engine.url,
        username=engine.username,
        password_file=password_file,
        ca_file=engine.ca_file,
        request_timeout=10,
    )


@pytest.fixture
async def client(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[EngineClient]:
    async with EngineClient(make_config(engine, tmp_path), retry_policy=FAST) as c:
        yield c


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def threads_named(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


async def test_test_logs_in_once_and_close_logs_out(engine: FakeEngine, tmp_path: Path) -> None:
    client = EngineClient(make_config(engine, tmp_path))
    assert await client.test() == "4.5.7-tessera-lab"
    assert await client.test() == "4.5.7-tessera-lab"
    assert len(engine.sessions) == 1
    assert threads_named(client.thread_name_prefix)
    await client.close()
    await client.close()  # idempotent
    assert len(engine.sessions) == 0
    assert threads_named(client.thread_name_prefix) == []
    with pytest.raises(RuntimeError, match="closed"):
        await client.test()


async def test_concurrent_calls_use_one_connection_per_thread(client: EngineClient) -> None:
    # Every call waits at the barrier until MAX_API_CALLS calls run at once, so they must be
    # on MAX_API_CALLS different threads; a broken barrier (timeout) fails the test, never hangs.
    barrier = threading.Barrier(MAX_API_CALLS)

    def probe(conn: sdk.Connection) -> tuple[sdk.Connection, str, int]:
        barrier.wait(timeout=20)
        vms = conn.system_service().vms_service().list()
        return conn, threading.current_thread().name, len(vms)

    results = await asyncio.gather(
        *(client.call(probe, f"probe {i}") for i in range(MAX_API_CALLS))
    )
    connections = {id(conn) for conn, _, _ in results}
    thread_names = {name for _, name, _ in results}
    assert len(connections) == MAX_API_CALLS
    assert len(thread_names) == MAX_API_CALLS
    assert all(n.startswith(client.thread_name_prefix) for n in thread_names)
    assert {count for _, _, count in results} == {3}


async def test_connections_share_one_sso_login(client: EngineClient, engine: FakeEngine) -> None:
    barrier = threading.Barrier(2)

    def probe(conn: sdk.Connection) -> int:
        barrier.wait(timeout=20)
        return id(conn)

    ids = await asyncio.gather(client.call(probe, "a"), client.call(probe, "b"))
    assert len(set(ids)) == 2
    assert len(engine.sessions) == 1  # the second connection reused the first one's token


async def test_renewed_tokens_are_logged_out_too(engine: FakeEngine, tmp_path: Path) -> None:
    client = EngineClient(make_config(engine, tmp_path))
    await client.test()
    engine.sessions.revoke_all()  # the token "expired": the SDK logs in again on the 401
    assert await client.test() == "4.5.7-tessera-lab"
    assert len(engine.sessions) == 1
    await client.close()
    assert len(engine.sessions) == 0


async def test_wrong_password_is_auth_error_not_retried(engine: FakeEngine, tmp_path: Path) -> None:
    sleeps = Sleeps()
    config = make_config(engine, tmp_path, password="wrong")
    async with EngineClient(config, retry_policy=FAST, sleep=sleeps) as client:
        with pytest.raises(EngineAuthError) as info:
            await client.test()
    error = info.value
    assert isinstance(error, ConfigError)
    assert not error.retryable
    assert "admin@internal" in str(error)
    assert engine.url in str(error)
    assert "access_denied" in str(error)
    assert "wrong" not in str(error)  # never the password
    assert sleeps.delays == []
    assert len(engine.sessions) == 0


@pytest.mark.parametrize("configured", [True, False], ids=["other-ca-file", "no-ca-file"])
async def test_an_untrusted_engine_certificate_says_so_with_a_hint(
    engine: FakeEngine, tmp_path: Path, configured: bool
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    ca_file = LabCa().issue(other).ca_file if configured else None
    config = make_config(engine, tmp_path)
    config = EngineConfig(config.url, config.username, config.password_file, ca_file=ca_file)
    sleeps = Sleeps()
    async with EngineClient(config, retry_policy=FAST, sleep=sleeps) as client:
        with pytest.raises(EngineTlsError) as info:
            await client.test()
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert sleeps.delays == []  # a wrong CA does not fix itself
    assert "HTTP None" not in message
    assert "the engine's TLS certificate is not trusted (unable to get local issuer" in message
    assert "pki-resource?resource=ca-certificate" in message
    if configured:
        assert f"ca_file {ca_file} is not the CA that issued the engine's certificate" in message
    else:
        assert "no ca_file is set and the system's CAs do not trust the engine" in message


async def test_unreadable_password_file_is_config_error(engine: FakeEngine, tmp_path: Path) -> None:
    sleeps = Sleeps()
    config = make_config(engine, tmp_path)
    missing = tmp_path / "nope.password"
    config = EngineConfig(config.url, config.username, missing, config.ca_file)
    async with EngineClient(config, retry_policy=FAST, sleep=sleeps) as client:
        with pytest.raises(ConfigError, match=r"nope\.password"):
            await client.test()
    assert sleeps.delays == []


async def test_unknown_vm_is_not_found_naming_the_id(client: EngineClient) -> None:
    missing = lab_id("vm", "nosuchvm")
    with pytest.raises(EngineNotFound) as info:
        await client.call(
            lambda c: c.system_service().vms_service().vm_service(missing).get(),
            "get VM",
            obj=f"VM {missing}",
        )
    assert missing in str(info.value)
    assert "get VM" in str(info.value)
    assert not info.value.retryable


async def test_refused_request_is_api_error_with_code_and_detail(client: EngineClient) -> None:
    with pytest.raises(EngineApiError) as info:
        await client.call(
            lambda c: c.system_service().vms_service().list(search="colour=red"), "search VMs"
        )
    assert info.value.fields["code"] == 400
    assert "colour" in str(info.value)


async def test_engine_not_listening_is_transient_after_retries(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("secret\n")
    config = EngineConfig(
        url=f"https://127.0.0.1:{closed_port()}/ovirt-engine/api",
        username="admin@internal",
        password_file=password_file,
    )
    sleeps = Sleeps()
    async with EngineClient(config, retry_policy=FAST, sleep=sleeps) as client:
        with pytest.raises(EngineUnavailable) as info:
            await client.test()
        assert isinstance(info.value, TransientError)
        assert config.url in str(info.value)
        assert len(sleeps.delays) == FAST.attempts - 1

        sleeps.delays.clear()
        with pytest.raises(EngineUnavailable):
            await client.call(lambda c: c.system_service().get(), "create", idempotent=False)
        assert sleeps.delays == []  # a non-idempotent call is tried once
    assert threads_named(client.thread_name_prefix) == []


def test_transient_classification() -> None:
    multi = "Failed to read response: [(<pycurl.Curl object at 0x5>, 52, 'Empty reply')]"
    assert _is_transient(sdk.Error(multi))
    assert _is_transient(sdk.Error("Error while sending HTTP request: (56, 'Recv failure')"))
    assert _is_transient(sdk.ConnectionError("refused"))
    assert _is_transient(sdk.TimeoutError("slow"))
    assert _is_transient(sdk.Error("busy", code=503))
    assert not _is_transient(sdk.Error("conflict", code=409))
    assert not _is_transient(sdk.Error("Error while sending HTTP request: (60, 'SSL cert')"))


def test_max_calls_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_calls"):
        EngineClient(EngineConfig("https://x/ovirt-engine/api", "u", tmp_path / "p", max_calls=0))
