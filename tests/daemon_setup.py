"""What the tests of the service share: a daemon configuration on one new encrypted store,
and the daemon run in this process (``Service.run``, no API listeners) until it is ready.

``daemon_config(tmp_path, passphrase, extra)`` writes ``config.yaml`` (the store ``main``,
the API socket and the scheduler state under ``tmp_path``) plus ``extra`` YAML sections
(engines, maintenance, smtp). ``running(config)`` yields the ``Service`` once it is ready
(``Service.ready``) and stops it at the end; a daemon that fails to start fails the test
with its error."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.config.loader import load_all
from engine.daemon.service import Service
from engine.store.chunk_store import Store
from engine.store.keys import KdfParams

CHUNK = 64 * 1024
READY_TIMEOUT = 60.0


def daemon_config(tmp_path: Path, passphrase: str, extra: str = "") -> Path:
    store = tmp_path / "store"
    Store.init(store, chunk_size=CHUNK, passphrase=passphrase.encode(), kdf=KdfParams(n=2**10))
    (tmp_path / "pass").write_text(passphrase + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"stores:\n  - name: main\n    path: {store}\n    passphrase_file: {tmp_path / 'pass'}\n"
        f"api:\n  socket: {tmp_path / 'api.sock'}\n"
        f"scheduler:\n  state_file: {tmp_path / 'scheduler.json'}\n" + extra
    )
    return config


async def no_api(service: Service) -> Callable[[], Awaitable[None]]:
    """``Service.run``'s listeners, none: the tests call the service directly."""

    async def stop() -> None:
        return None

    return stop


@contextlib.asynccontextmanager
async def running(config: Path, **kwargs: Any) -> AsyncIterator[Service]:
    """The daemon of ``config`` (``Service`` keyword arguments: ``kwargs``), once ready."""
    service = Service(load_all(config), **({"grace": 5} | kwargs))
    task = asyncio.create_task(service.run(no_api))
    ready = asyncio.create_task(service.ready.wait())
    await asyncio.wait((ready, task), timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        if task.done():
            task.result()  # the daemon's own error
        service.request_stop()
        await task
        raise AssertionError(f"the daemon was not ready in {READY_TIMEOUT} s")
    try:
        yield service
    finally:
        service.request_stop()
        await task
