"""The asyncio NBD server (``serve``) with an in-memory backend, spoken to by the
repository's client: replies out of order, backend errors as EIO on one request only, a
client that vanishes mid-request, the unix socket's mode and removal."""

import asyncio
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.errors import StoreError
from engine.io.nbd import connect
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import EIO, NbdRequestError
from engine.io.nbd.handshake import Handshake
from engine.io.nbd.serve import Listener, ServerStats, serve
from engine.io.nbd.server import Data, ExportSpec, Hole, Piece

SIZE = 1 << 20


class MemoryBackend:
    """Bytes in memory; a read at ``gate_at`` waits for ``gate``; ``fail_at`` raises."""

    def __init__(self) -> None:
        self.data = bytearray(range(256)) * (SIZE // 256)
        self.data[SIZE // 2 :] = bytes(SIZE // 2)
        self.gate = asyncio.Event()
        self.gate_at = -1
        self.fail_at = -1
        self.waiting = asyncio.Event()

    async def read(self, offset: int, length: int) -> list[Piece]:
        if offset == self.gate_at:
            self.waiting.set()
            await self.gate.wait()
        if offset == self.fail_at:
            raise StoreError(path="/store", reason="pack 0a is missing")
        if offset >= SIZE // 2:
            return [Hole(offset, length)]
        return [Data(offset, bytes(self.data[offset : offset + length]))]

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        half = SIZE // 2
        if offset < half:
            return [(half - offset, 0), (length, p.STATE_HOLE | p.STATE_ZERO)]
        return [(length, p.STATE_HOLE | p.STATE_ZERO)]

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        return None


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[MemoryBackend, Path, ServerStats]]:
    backend = MemoryBackend()
    sock = tmp_path / "s.sock"
    spec = ExportSpec("mem", SIZE, read_only=False, preferred_block=65536)
    ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    stats = ServerStats()
    task = asyncio.create_task(
        serve(backend, spec, [Listener(path=sock)], ready=ready, stats=stats)
    )
    assert await ready == [f"unix:{sock}"]
    try:
        yield backend, sock, stats
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not sock.exists()


async def test_socket_is_0600_and_reads_writes_status_work(
    server: tuple[MemoryBackend, Path, ServerStats],
) -> None:
    backend, sock, _ = server
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    async with await connect(sock, meta_contexts=[p.BASE_ALLOCATION]) as client:
        assert await client.read(10, 20) == bytes(backend.data[10:30])
        assert await client.read(SIZE - 10, 10) == bytes(10)
        await client.write(0, b"hello")
        await client.write_zeroes(5, 5)
        await client.flush()
        assert await client.read(0, 12) == b"hello" + bytes(5) + bytes(backend.data[10:12])
        status = await client.block_status(0, SIZE, p.BASE_ALLOCATION)
        assert [(e.start, e.length, e.zero) for e in status] == [
            (0, SIZE // 2, False),
            (SIZE // 2, SIZE // 2, True),
        ]


async def test_replies_come_as_requests_finish_and_errors_stay_per_request(
    server: tuple[MemoryBackend, Path, ServerStats],
) -> None:
    backend, sock, _ = server
    backend.gate_at, backend.fail_at = 4096, 8192
    async with await connect(sock) as client:
        slow = asyncio.create_task(client.read(4096, 100))
        await backend.waiting.wait()
        # The slow read holds its reply; a later one is answered first.
        assert await client.read(0, 4) == bytes(backend.data[:4])
        with pytest.raises(NbdRequestError) as failed:
            await client.read(8192, 10)
        assert failed.value.errno == EIO and "pack 0a is missing" in str(failed.value)
        assert not slow.done()
        backend.gate.set()
        assert await slow == bytes(backend.data[4096:4196])


async def test_a_client_vanishing_mid_request_leaves_the_server_serving(
    server: tuple[MemoryBackend, Path, ServerStats],
) -> None:
    backend, sock, stats = server
    backend.gate_at = 4096
    unhandled: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
    reader, writer = await asyncio.open_unix_connection(sock)
    hs = Handshake()
    while not hs.done:
        hs.receive_data(await reader.read(65536))
        writer.write(hs.data_to_send())
    writer.write(p.encode_request(p.CMD_READ, 1, 4096, 100))
    await backend.waiting.wait()
    writer.close()
    await writer.wait_closed()
    backend.gate.set()
    async with await connect(sock) as client:
        assert await client.read(0, 4) == bytes(backend.data[:4])
    assert stats.connections == 2
    assert unhandled == []
