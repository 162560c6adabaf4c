"""The asyncio client against a scripted server: pipelining, splitting, short block status
answers, cancellation, and every way a connection can end badly."""

import asyncio
from pathlib import Path

import pytest

from engine.core.errors import TransientError
from engine.core.extent import Extent
from engine.io.nbd import client as nbd_client
from engine.io.nbd import connect, extents
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import (
    EINVAL,
    ESHUTDOWN,
    NbdConnectionError,
    NbdProtocolError,
    NbdRequestError,
    NbdTransientRequestError,
)
from tests.unit.io import nbd_wire as w
from tests.unit.io.fake_nbd import FakeServer, serve_memory

BOUNDED = 5.0  # seconds a test waits for an event the server sets; never reached when green


def pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) * 7 % 251 for i in range(length))


async def test_pipelined_requests_answered_in_reverse(tmp_path: Path) -> None:
    held: list[p.Request] = []

    async def reverse(server: FakeServer, req: p.Request, payload: bytes) -> None:
        held.append(req)
        if len(held) == 8:  # all eight are on the wire before the first answer
            for r in reversed(held):
                server.send(w.data_chunk(r.cookie, r.offset, pattern(r.offset, r.length), True))

    async with FakeServer(tmp_path / "s", reverse) as server:
        async with await connect(server.address) as client:
            offsets = [i * 4096 for i in range(8)]
            results = await asyncio.gather(*(client.read(o, 1000) for o in offsets))
    assert results == [pattern(o, 1000) for o in offsets]


async def test_large_reads_and_writes_are_split(tmp_path: Path) -> None:
    async with FakeServer(tmp_path / "s", block_size=(512, 4096, 64 * 1024)) as server:
        server.memory[:] = pattern(0, len(server.memory))
        async with await connect(server.address) as client:
            assert client.max_request == 64 * 1024
            buf = bytearray(300_000)
            view = memoryview(buf)[100_000:300_000]
            await client.readinto(4096, view)
            assert bytes(view) == pattern(4096, 200_000)
            assert bytes(buf[:100_000]) == bytes(100_000)  # nothing outside the view
            reads = [(r.offset, r.length) for r in server.requests if r.kind == p.CMD_READ]
            assert reads == [(4096, 65536), (69632, 65536), (135168, 65536), (200704, 3392)]

            data = bytes(range(256)) * 600
            await client.write(8192, data)
            writes = [r.length for r in server.requests if r.kind == p.CMD_WRITE]
            assert writes == [65536, 65536, 22528]
            assert server.memory[8192 : 8192 + len(data)] == data
            assert await client.read(8192, len(data)) == data


async def test_extents_asks_again_after_short_answers(tmp_path: Path) -> None:
    # The server knows 4 KiB blocks: data, data, zero, zero, data, ... and answers one block
    # per request, the last one running past the range.
    kinds = [0, 0, 3, 3, 0, 2, 2, 2]

    async def one_block(server: FakeServer, req: p.Request, payload: bytes) -> None:
        block = req.offset // 4096
        left = 4096 - req.offset % 4096
        size = left if block < len(kinds) - 1 else left + 4096 * 10
        server.send(w.status_chunk(req.cookie, 1, [(size, kinds[block])], True))

    async with FakeServer(tmp_path / "s", one_block, size=8 * 4096) as server:
        async with await connect(server.address) as client:
            found = [e async for e in extents(client, 100, 8 * 4096 - 200)]
    assert found == [
        Extent(100, 8092),
        Extent(8192, 8192, zero=True, hole=True),
        Extent(16384, 4096),
        Extent(20480, 12188, zero=True),
    ]


async def test_extents_bounds(tmp_path: Path) -> None:
    async with FakeServer(tmp_path / "s") as server:
        async with await connect(server.address) as client:
            with pytest.raises(ValueError, match="outside the export"):
                [e async for e in extents(client, 0, client.export_size + 1)]
            assert [e async for e in extents(client, 5, 0)] == []
            with pytest.raises(ValueError, match="'qemu:dirty-bitmap:x' was not negotiated"):
                await client.block_status(0, 10, "qemu:dirty-bitmap:x")


async def test_request_error_keeps_the_connection(tmp_path: Path) -> None:
    async def fail_first(server: FakeServer, req: p.Request, payload: bytes) -> None:
        if len(server.requests) == 1:
            server.send(w.error_chunk(req.cookie, EINVAL, "bad offset"))
        else:
            await serve_memory(server, req, payload)

    async with FakeServer(tmp_path / "s", fail_first) as server:
        async with await connect(server.address) as client:
            with pytest.raises(NbdRequestError) as info:
                await client.read(512, 1024)
            assert not info.value.retryable
            assert "READ offset=512 length=1024" in str(info.value)
            assert "EINVAL (bad offset)" in str(info.value)
            assert await client.read(0, 10) == bytes(10)


async def test_connection_lost_fails_pending_and_later_requests(tmp_path: Path) -> None:
    async def hang_up_on_third(server: FakeServer, req: p.Request, payload: bytes) -> None:
        if len(server.requests) == 3:
            server.hang_up()

    async with FakeServer(tmp_path / "s", hang_up_on_third) as server:
        client = await connect(server.address)
        results = await asyncio.gather(
            *(client.read(i * 512, 512) for i in range(3)), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, NbdConnectionError)
            assert isinstance(result, TransientError)
            assert "the server closed the connection" in str(result)
        with pytest.raises(NbdConnectionError):
            await client.read(0, 1)
        await client.close()


async def test_protocol_violation_fails_everything(tmp_path: Path) -> None:
    async def garbage_on_second(server: FakeServer, req: p.Request, payload: bytes) -> None:
        if len(server.requests) == 2:
            server.send(b"\x01\x02\x03\x04" + bytes(12))

    async with FakeServer(tmp_path / "s", garbage_on_second) as server:
        client = await connect(server.address)
        results = await asyncio.gather(client.read(0, 512), client.flush(), return_exceptions=True)
        for result in results:
            assert isinstance(result, NbdProtocolError)
            assert "bad reply magic 0x01020304" in str(result)
        with pytest.raises(NbdProtocolError):
            await client.flush()
        await client.close()


async def test_cancelled_read_never_writes_the_buffer(tmp_path: Path) -> None:
    async def late(server: FakeServer, req: p.Request, payload: bytes) -> None:
        if len(server.requests) == 1:
            await server.release.wait()  # answered only after the caller gave up
        await serve_memory(server, req, payload)

    async with FakeServer(tmp_path / "s", late) as server:
        server.memory[:] = b"\xab" * len(server.memory)
        async with await connect(server.address) as client:
            buf = bytearray(b"\xee" * 4096)
            task = asyncio.create_task(client.readinto(0, memoryview(buf)))
            async with asyncio.timeout(BOUNDED):
                await server.got_request.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            server.release.set()
            # The late reply is parsed (its cookie released) but lands in the discard buffer.
            assert await client.read(0, 16) == b"\xab" * 16
            assert buf == b"\xee" * 4096


async def test_eshutdown_leads_to_a_soft_disconnect(tmp_path: Path) -> None:
    async def shutting_down(server: FakeServer, req: p.Request, payload: bytes) -> None:
        server.send(w.error_chunk(req.cookie, ESHUTDOWN))

    async with FakeServer(tmp_path / "s", shutting_down) as server:
        client = await connect(server.address)
        with pytest.raises(NbdTransientRequestError, match="ESHUTDOWN"):
            await client.read(0, 512)
        async with asyncio.timeout(BOUNDED):
            await server.disconnected.wait()  # the client sent NBD_CMD_DISC by itself
        with pytest.raises(NbdConnectionError):
            await client.read(0, 512)
        await client.close()


async def test_close_waits_for_requests_in_flight(tmp_path: Path) -> None:
    async def late(server: FakeServer, req: p.Request, payload: bytes) -> None:
        await server.release.wait()
        await serve_memory(server, req, payload)

    async with FakeServer(tmp_path / "s", late) as server:
        client = await connect(server.address)
        read = asyncio.create_task(client.read(0, 100))
        async with asyncio.timeout(BOUNDED):
            await server.got_request.wait()
        close = asyncio.create_task(client.close())
        server.release.set()
        assert await read == bytes(100)
        await close
        assert [r.kind for r in server.requests] == [p.CMD_READ, p.CMD_DISC]
        with pytest.raises(NbdConnectionError, match="closed by the client"):
            await client.read(0, 1)


async def test_tcp_address_and_simple_replies(tmp_path: Path) -> None:
    async def simple_reads(server: FakeServer, req: p.Request, payload: bytes) -> None:
        server.send(
            w.simple(req.cookie, data=bytes(server.memory[req.offset : req.offset + req.length]))
        )

    async with FakeServer(tmp_path / "s", simple_reads, structured=False, tcp=True) as server:
        server.memory[:4] = b"abcd"
        async with await connect(server.address) as client:
            assert client.server.startswith("127.0.0.1:")
            assert not client.structured
            assert dict(client.contexts) == {}
            assert await client.read(0, 6) == b"abcd\0\0"


async def test_unsupported_commands_are_refused_locally(tmp_path: Path) -> None:
    async with FakeServer(tmp_path / "s", flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY) as server:
        async with await connect(server.address) as client:
            assert client.read_only
            with pytest.raises(ValueError, match="WRITE_ZEROES"):
                await client.write_zeroes(0, 4096)
            with pytest.raises(ValueError, match="FLUSH"):
                await client.flush()
        assert server.requests == [p.Request(0, p.CMD_DISC, server.requests[0].cookie, 0, 0)]


async def test_connect_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NbdConnectionError, match="cannot connect") as info:
        await connect(tmp_path / "missing.sock")
    assert info.value.retryable

    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # says nothing until the client gives up
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_unix_server(silent, path=tmp_path / "silent.sock")
    async with server:
        monkeypatch.setattr(nbd_client, "CONNECT_TIMEOUT", 0.05)
        with pytest.raises(NbdConnectionError, match="no NBD handshake within"):
            await connect(tmp_path / "silent.sock")
        async with asyncio.timeout(BOUNDED):
            await hung_up.wait()  # the client dropped the connection it gave up on


async def test_connect_refuses_unknown_contexts() -> None:
    with pytest.raises(ValueError, match="qemu:allocation-depth"):
        await connect("/nonexistent", meta_contexts=("qemu:allocation-depth",))


def test_works_under_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop: its BufferedProtocol path must fill caller buffers too."""
    import uvloop

    async def main() -> None:
        async with FakeServer(tmp_path / "s") as server:
            server.memory[:] = pattern(0, len(server.memory))
            async with await connect(server.address) as client:
                buf = bytearray(len(server.memory))
                await client.readinto(0, memoryview(buf))
                assert buf == server.memory
                await client.write(100, b"x" * 100)
                assert await client.read(100, 100) == b"x" * 100

    uvloop.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_keep_their_order_behind_bytes_the_socket_could_not_take(
    tmp_path: Path, loop: str
) -> None:
    """``Connection.send`` writes straight to the socket only while the transport holds
    nothing: with the server not reading, a large write's payload fills the socket and the
    rest waits in the transport; requests sent meanwhile must follow it, not overtake it
    (an overtaking header would land inside the payload and the server would parse junk)."""
    import uvloop

    async def main() -> None:
        gate = asyncio.Event()

        async def gated(server: FakeServer, req: p.Request, payload: bytes) -> None:
            if len(server.requests) == 1:
                await gate.wait()  # the server reads nothing more until the gate opens
            await serve_memory(server, req, payload)

        async with FakeServer(tmp_path / "s", gated, size=4 << 20) as server:
            server.memory[:] = pattern(0, len(server.memory))
            async with await connect(server.address) as client:
                first = asyncio.create_task(client.read(0, 4096))
                data = bytes(range(256)) * (8 << 10)  # 2 MiB: more than the socket takes
                write = asyncio.create_task(client.write(1 << 20, data))
                transport = client._conn.transport
                assert transport is not None
                async with asyncio.timeout(BOUNDED):
                    while not transport.get_write_buffer_size():
                        await asyncio.sleep(0.01)
                offsets = [(3 << 20) + i * 4096 for i in range(4)]
                reads = [asyncio.create_task(client.read(o, 4096)) for o in offsets]
                async with asyncio.timeout(BOUNDED):  # their headers are sent (registered)
                    while len(client._conn._waiters) < 2 + len(offsets):
                        await asyncio.sleep(0)
                gate.set()
                # While the transport still holds payload, the socket has room again as the
                # server reads: the moment a header could overtake. Keep sending through it.
                while transport.get_write_buffer_size() and len(offsets) < 200:
                    offsets.append((3 << 20) + len(offsets) % 256 * 4096)
                    reads.append(asyncio.create_task(client.read(offsets[-1], 4096)))
                    await asyncio.sleep(0)
                assert len(offsets) > 4, "the transport was never seen holding bytes after the gate"
                async with asyncio.timeout(BOUNDED):
                    assert await first == pattern(0, 4096)
                    await write
                    assert await asyncio.gather(*reads) == [pattern(o, 4096) for o in offsets]
            assert server.memory[1 << 20 : 3 << 20] == data

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())
