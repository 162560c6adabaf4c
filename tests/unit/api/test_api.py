"""The daemon API's edges: auth on the TCP listener, clear 4xx answers for bad requests,
never a traceback, and an OpenAPI description that matches the routes."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.api.openapi import PATHS, document
from engine.api.server import build_app, content_disposition, load_tokens
from engine.config.loader import load_all
from engine.core.errors import ConfigError
from engine.daemon.jobs import JobView
from engine.daemon.service import Service

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def service(tmp_path: Path) -> Service:
    config = tmp_path / "config.yaml"
    config.write_text(f"api:\n  socket: {tmp_path / 'api.sock'}\n")
    return Service(load_all(config))


@pytest.fixture
async def client(service: Service) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(build_app(service, (TOKEN.encode(),)))) as c:
        yield c


@pytest.fixture
async def open_client(service: Service) -> AsyncIterator[TestClient[object, object]]:
    async with TestClient(TestServer(build_app(service))) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ],
)
async def test_tcp_listener_refuses_requests_without_a_valid_token(
    client: TestClient[object, object], headers: dict[str, str]
) -> None:
    response = await client.get("/v1/status", headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert await response.json() == {"error": "a valid bearer token is required"}


async def test_valid_token_is_accepted(client: TestClient[object, object]) -> None:
    response = await client.get("/v1/status", headers=AUTH)
    assert response.status == 200
    assert (await response.json())["running_jobs"] == []


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"not json", 400, "bad request body"),
        (b'{"vms": ["a"], "colour": "red"}', 400, "unknown field `colour`"),
        (b'{"vms": "a"}', 400, "Expected `array`"),
        (b'{"vms": []}', 400, "at least one VM"),
        (b'{"vms": ["a"]}', 400, "0 engines"),  # no engine configured: said, not a 500
    ],
)
async def test_bad_backup_requests_get_clear_400s(
    open_client: TestClient[object, object], body: bytes, status: int, fragment: str
) -> None:
    response = await open_client.post("/v1/backups", data=body)
    assert response.status == status
    error = (await response.json())["error"]
    assert fragment in error
    assert "Traceback" not in error


async def test_unknown_objects_are_404_with_the_name(
    open_client: TestClient[object, object],
) -> None:
    response = await open_client.get("/v1/jobs/nope")
    assert response.status == 404
    assert "nope" in (await response.json())["error"]
    response = await open_client.post("/v1/policies/missing/run")
    assert response.status == 404
    assert "missing" in (await response.json())["error"]
    response = await open_client.get("/v1/no-such-route")
    assert response.status == 404
    assert "error" in await response.json()


async def test_unexpected_fault_is_a_500_without_traceback(
    open_client: TestClient[object, object], service: Service
) -> None:
    async def broken(engine: str | None = None) -> list[dict[str, object]]:
        raise ZeroDivisionError("boom")

    service.list_vms = broken  # type: ignore[method-assign]
    response = await open_client.get("/v1/vms")
    assert response.status == 500
    error = (await response.json())["error"]
    assert error == "internal error (ZeroDivisionError); see the daemon log"


async def test_jobs_listing_shows_progress(
    open_client: TestClient[object, object], service: Service
) -> None:
    view = JobView("20261128T000000-abcdef", "backup", "vm1")
    view.progress("disk-a", 50, 100)
    service.jobs._jobs[view.job_id] = view  # a job as the manager holds it
    (doc,) = await (await open_client.get("/v1/jobs")).json()
    assert doc["disks"]["disk-a"]["done"] == 50
    assert doc["disks"]["disk-a"]["total"] == 100


async def test_openapi_describes_every_route(open_client: TestClient[object, object]) -> None:
    doc = await (await open_client.get("/v1/openapi.json")).json()
    assert doc == document() | {}
    app = open_client.server.app
    assert app is not None
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    assert routes - {"/metrics"} == set(PATHS) - {"/metrics"}
    assert "BackupRequest" in doc["components"]["schemas"]


def test_tokens_file_errors_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=f"tokens file {empty} holds no token"):
        load_tokens(empty)
    with pytest.raises(ConfigError, match=r"tokens file .*missing"):
        load_tokens(tmp_path / "missing")
    empty.write_text("abc # a comment\n def\n")
    assert load_tokens(empty) == (b"abc", b"def")


async def test_tcp_listener_with_tls_and_tokens(tmp_path: Path) -> None:
    """The configured TCP listener really serves TLS and wants a token; the unix socket is
    created 0600 and needs none."""
    import socket
    import stat

    import aiohttp

    from engine.api.server import start_listeners
    from tests.integration.selfsigned import make_cert

    cert = make_cert(tmp_path)
    (tmp_path / "tokens").write_text(f"{TOKEN}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(
        f"api:\n  socket: {tmp_path / 'api.sock'}\n  tcp:\n    listen: 127.0.0.1:{port}\n"
        f"    cert_file: {cert.cert}\n    key_file: {cert.key}\n"
        f"    tokens_file: {tmp_path / 'tokens'}\n"
    )
    stop = await start_listeners(Service(load_all(config)))
    try:
        assert stat.S_IMODE((tmp_path / "api.sock").stat().st_mode) == 0o600
        connector = aiohttp.TCPConnector(ssl=cert.client_context())
        async with aiohttp.ClientSession(connector=connector) as http:
            url = f"https://localhost:{port}/v1/status"
            async with http.get(url) as response:
                assert response.status == 401
            async with http.get(url, headers=AUTH) as response:
                assert response.status == 200
                assert (await response.json())["running_jobs"] == []
        unix = aiohttp.UnixConnector(path=str(tmp_path / "api.sock"))
        async with aiohttp.ClientSession(connector=unix) as http:
            async with http.get("http://tessera/v1/status") as response:
                assert response.status == 200
    finally:
        await stop()
    assert not (tmp_path / "api.sock").exists()


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("hostname", "attachment; filename=\"hostname\"; filename*=UTF-8''hostname"),
        (
            'a"b\\c;d.txt',
            "attachment; filename=\"a_b_c_d.txt\"; filename*=UTF-8''a%22b%5Cc%3Bd.txt",
        ),
        (
            "résumé\r\n.pdf",
            "attachment; filename=\"r_sum___.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%0D%0A.pdf",
        ),
    ],
)
def test_content_disposition_never_puts_a_raw_guest_name_in_a_header(
    name: str, header: str
) -> None:
    assert content_disposition(name) == header


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "fragment"),
    [
        ("POST", "/v1/exports", b'{"snapshot": "ab", "ttl_seconds": -1}', 400, "ttl_seconds"),
        ("POST", "/v1/exports", b'{"snapshot": "ab", "colour": 1}', 400, "unknown field"),
        ("POST", "/v1/exports", b"{}", 400, "missing required field `snapshot`"),
        ("GET", "/v1/files/nope", b"", 404, "no files session 'nope'"),
        ("GET", "/v1/files/nope?wait=soon", b"", 400, "`wait` must be a number"),
        ("GET", "/v1/files/nope?wait=nan", b"", 400, "`wait` must be a number"),
        ("DELETE", "/v1/files/nope", b"", 404, "no files session"),
        ("GET", "/v1/files/nope/ls", b"", 400, "`path` is required"),
        ("GET", "/v1/files/nope/ls?path=/sda1/../..", b"", 400, "give an absolute path"),
        ("GET", "/v1/files/nope/find?path=etc", b"", 400, "give an absolute path"),
        ("GET", "/v1/files/nope/download?path=/sda1/x", b"", 404, "no files session"),
    ],
)
async def test_exports_and_files_refuse_bad_requests_before_any_work(
    open_client: TestClient[object, object],
    method: str,
    url: str,
    body: bytes,
    status: int,
    fragment: str,
) -> None:
    response = await open_client.request(method, url, data=body)
    assert response.status == status
    assert fragment in (await response.json())["error"]
