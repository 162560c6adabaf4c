"""The engine CA that imageio is verified with: the configured file, else the engine's own
pki-resource, fetched only over a verified https connection.

The lab engine's certificate is issued by the lab CA, which no system store trusts: the tests
that fetch make it the "system" store for Python's ssl through ``SSL_CERT_FILE``.
"""

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugins.lab.engine import FakeEngine, demo_seed
from plugins.lab.tls import LabCa
from plugins.ovirt.client import EngineClient, EngineConfig
from plugins.ovirt.engine_ca import (
    EngineCa,
    EngineCaError,
    EngineCaUnavailable,
    fetch_engine_ca,
    pki_url,
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(demo_seed(), tmp_path) as fake:
        yield fake


def config(engine: FakeEngine, tmp_path: Path, ca_file: Path | None) -> EngineConfig:
    password_file = tmp_path / "engine.password"
    password_file.write_text(engine.password + "\n")
    return EngineConfig(engine.url, engine.username, password_file, ca_file=ca_file)


async def test_the_configured_ca_file_is_used_as_is(engine: FakeEngine, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    configured = LabCa().issue(other).ca_file  # not the engine's: the file wins anyway
    async with EngineClient(config(engine, tmp_path, configured)) as client:
        ca = await client.engine_ca()
    assert ca.pem == configured.read_text()
    assert ca.source == str(configured)


async def test_without_ca_file_the_ca_is_fetched_from_pki_resource(
    engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(engine.ca_file))  # the system trusts the engine
    async with EngineClient(config(engine, tmp_path, None)) as client:
        ca = await client.engine_ca()
        assert await client.engine_ca() is ca  # once per client
    assert ca.pem == engine.ca_file.read_text()
    assert ca.source == pki_url(engine.url)
    assert ca.source == (
        f"https://127.0.0.1:{engine.port}/ovirt-engine/services/pki-resource"
        "?resource=ca-certificate&format=X509-PEM-CA"
    )
    assert ca.context().get_ca_certs()  # usable: the context trusts exactly that CA
    assert len(ca.context().get_ca_certs()) == 1


async def test_an_engine_the_system_does_not_trust_is_not_asked(
    engine: FakeEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(LabCa().issue(other).ca_file))
    with pytest.raises(EngineCaError, match="not trusted by the system") as info:
        await fetch_engine_ca(engine.url)
    assert "pki-resource" in str(info.value)
    assert not info.value.retryable


async def test_a_plain_http_engine_is_refused_without_a_request() -> None:
    # Port 9 (discard) on loopback: if a request were made it would fail differently.
    with pytest.raises(EngineCaError, match=r"plain http.*set ca_file"):
        await fetch_engine_ca("http://127.0.0.1:9/ovirt-engine/api")


async def test_an_unreachable_engine_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineCaUnavailable) as info:
        await fetch_engine_ca(f"https://127.0.0.1:{port}/ovirt-engine/api", timeout=10)
    assert info.value.retryable


def test_a_file_that_is_not_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("hello\n")
    with pytest.raises(EngineCaError, match=f"{bad}: not a PEM certificate"):
        EngineCa.from_file(bad)
    with pytest.raises(EngineCaError, match="cannot read"):
        EngineCa.from_file(tmp_path / "missing.pem")
