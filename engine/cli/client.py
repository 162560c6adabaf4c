"""A small client for the daemon API over its unix socket (what the operator CLI uses).

``ApiClient.request`` returns the decoded JSON or raises ``ApiError`` with the daemon's own
message; ``DaemonUnavailable`` when nothing answers on the socket (the CLI then says how to
start the daemon, or runs the job in-process where that makes sense).
"""

from pathlib import Path
from typing import Any

import aiohttp

from engine.core.errors import ConfigError, EngineError


class DaemonUnavailable(EngineError):
    template = "no Tessera daemon answers on {socket}: {reason}"


class ApiError(EngineError):
    template = "daemon: {message} (HTTP {status})"


class ApiClient:
    def __init__(self, socket: Path):
        self.socket = socket
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "ApiClient":
        if not self.socket.exists():
            raise DaemonUnavailable(socket=self.socket, reason="the socket does not exist")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket)),
            timeout=aiohttp.ClientTimeout(total=300, connect=5),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, /, **query: str) -> Any:
        assert self._session is not None, "use ApiClient as an async context manager"
        params = {k: v for k, v in query.items() if v is not None}
        try:
            async with self._session.request(
                method, f"http://tessera{path}", json=body, params=params
            ) as response:
                doc = await response.json(content_type=None)
                if response.status >= 400:
                    message = doc.get("error") if isinstance(doc, dict) else str(doc)
                    if response.status == 404:
                        raise ConfigError(message=str(message))
                    raise ApiError(message=message, status=response.status)
                return doc
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(socket=self.socket, reason=str(e) or type(e).__name__) from e

    async def download(self, path: str, into: Path, /, **query: str) -> tuple[str, str]:
        """GET ``path`` streamed into the file ``into`` (made or replaced), 1 MiB at a time;
        returns the response's Content-Type and Content-Disposition. No total timeout: a
        large file takes as long as it takes, as long as bytes keep coming."""
        assert self._session is not None, "use ApiClient as an async context manager"
        timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=600)
        try:
            async with self._session.get(
                f"http://tessera{path}", params=query, timeout=timeout
            ) as response:
                if response.status >= 400:
                    doc = await response.json(content_type=None)
                    message = doc.get("error") if isinstance(doc, dict) else str(doc)
                    if response.status == 404:
                        raise ConfigError(message=str(message))
                    raise ApiError(message=message, status=response.status)
                with into.open("wb") as out:
                    async for block in response.content.iter_chunked(1 << 20):
                        out.write(block)
                return (
                    response.headers.get("Content-Type", ""),
                    response.headers.get("Content-Disposition", ""),
                )
        except (aiohttp.ClientConnectionError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(socket=self.socket, reason=str(e) or type(e).__name__) from e

    async def available(self) -> bool:
        try:
            await self.request("GET", "/v1/status")
        except DaemonUnavailable:
            return False
        return True
