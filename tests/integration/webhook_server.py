"""A real HTTP(S) server on loopback (aiohttp) that records what webhooks post to it.

``hook_server(receiver)`` yields the base URL; ``Receiver.calls`` holds each request's path,
headers and JSON body. ``Receiver.status`` is the answer (default 200), ``delay`` seconds
are waited before answering, ``redirect`` answers 307 to it."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.integration.selfsigned import CertFiles


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    calls: list[Call] = field(default_factory=list)
    status: int = 200
    answer: str = "ok"
    delay: float = 0.0
    redirect: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(Call(request.path, dict(request.headers), await request.json()))
        self.arrived.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect is not None:
            raise web.HTTPTemporaryRedirect(self.redirect)
        return web.Response(status=self.status, text=self.answer)


@asynccontextmanager
async def hook_server(receiver: Receiver, cert: CertFiles | None = None) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    context = cert.server_context() if cert is not None else None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if cert else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
