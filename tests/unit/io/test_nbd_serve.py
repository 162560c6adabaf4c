"""The asyncio NBD server (``serve``) with an in-memory backend, spoken to by the
repository's client: replies out of order, backend errors as EIO on one request only, a
client that vanishes mid-request, the unix socket's mode and removal; TLS after STARTTLS
(client certificates checked against the CA when one is given, a client in clear refused)."""

import asyncio
import contextlib
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.errors import StoreError
from engine.io.nbd import connect
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import EIO, NbdConnectionError, NbdOptionError, NbdRequestError
from engine.io.nbd.handshake import Handshake
from engine.io.nbd.serve import Listener, ServerStats, serve
from engine.io.nbd.server import Data, ExportSpec, Hole, Piece
from engine.io.nbd.tls import ServerTls, TlsFilesError
from engine.io.nbd.transmission import Transmission
from tests.helpers import capture_all_logs
from tests.nbd_tls import NbdTls, make_nbd_tls

SIZE = 1 << 20


class MemoryBackend:
    """Bytes in memory; a read at ``gate_at`` waits for ``gate``; ``fail_at`` raises."""

    def __init__(self) -> None:
        self.data = bytearray(range(256)) * (SIZE // 256)
        self.data[SIZE // 2 :] = bytes(SIZE // 2)
        self.gate = asyncio.Event()
        self.gate_at = -1
        self.fail_at = -1
        self.bug_at = -1
        self.waiting = asyncio.Event()

    async def read(self, offset: int, length: int) -> list[Piece]:
        if offset == self.gate_at:
            self.waiting.set()
            await self.gate.wait()
        if offset == self.fail_at:
            raise StoreError(path="/store", reason="pack 0a is missing")
        if offset == self.bug_at:
            raise ValueError("a bug in the backend")
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


async def test_a_fault_of_ours_ends_its_connection_loudly_and_the_server_serves_on(
    server: tuple[MemoryBackend, Path, ServerStats],
) -> None:
    backend, sock, _ = server
    backend.bug_at = 8192
    with capture_all_logs() as logs:
        async with await connect(sock) as client:
            with pytest.raises(NbdConnectionError):
                await client.read(8192, 10)
    faults = [e for e in logs if e["event"] == "nbd.connection.fault"]
    assert len(faults) == 1 and "a bug in the backend" in str(faults[0]["error"]), logs
    assert faults[0]["log_level"] == "error" and faults[0]["exc_info"] is not None
    async with await connect(sock) as client:  # the server goes on
        assert await client.read(0, 4) == bytes(backend.data[:4])


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> NbdTls:
    return make_nbd_tls(tmp_path_factory.mktemp("nbd-tls"))


@contextlib.asynccontextmanager
async def tls_server(
    tls: ServerTls, stats: ServerStats | None = None, read_only: bool = True
) -> AsyncIterator[tuple[MemoryBackend, int]]:
    backend = MemoryBackend()
    spec = ExportSpec("mem", SIZE, read_only=read_only, preferred_block=65536)
    ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    listener = Listener(host="127.0.0.1", port=0, tls=tls)
    task = asyncio.create_task(serve(backend, spec, [listener], ready=ready, stats=stats))
    (address,) = await ready
    try:
        yield backend, int(address.rpartition(":")[2])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def tls_read(port: int, context: ssl.SSLContext, offset: int, length: int) -> bytes:
    """STARTTLS, then this repository's handshake and one READ, all through TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hs = Handshake("", (p.BASE_ALLOCATION,))
        hs.receive_data(await reader.readexactly(p.GREETING.size))
        first = hs.data_to_send()  # client flags, then the first option
        flags = p.CLIENT_FLAGS.size
        writer.write(first[:flags] + p.encode_option(p.OPT_STARTTLS))
        reply = p.OPTION_REPLY_HEADER.unpack(await reader.readexactly(p.OPTION_REPLY_HEADER.size))
        assert reply == (p.OPTION_REPLY_MAGIC, p.OPT_STARTTLS, p.REP_ACK, 0)
        await writer.start_tls(context, server_hostname="127.0.0.1")
        writer.write(first[flags:])
        while not hs.done:
            data = await reader.read(65536)
            if not data:
                raise ConnectionResetError("server closed the connection")
            hs.receive_data(data)
            writer.write(hs.data_to_send())
        info = hs.info
        tx = Transmission(structured=info.structured, context_ids=info.contexts.values())
        buf = memoryview(bytearray(length))
        command, header = tx.request(p.CMD_READ, offset, length, buf=buf)
        writer.write(header)
        while not tx.receive_data(await reader.read(65536)):
            pass
        assert command.failure is None
        writer.write(tx.disconnect())
        return bytes(buf)
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_tls_listener_serves_after_starttls_with_a_client_certificate(
    certs: NbdTls,
) -> None:
    stats = ServerStats()
    async with tls_server(ServerTls.from_dir(certs.server), stats) as (backend, port):
        got = await tls_read(port, certs.client_context(certs.client), 100, 5000)
        assert got == bytes(backend.data[100:5100])
        # Twice: the ssl context is the listener's, shared by its connections.
        got = await tls_read(port, certs.client_context(certs.client), 0, 10)
        assert got == bytes(backend.data[:10])
    assert stats.connections == 2


async def test_tls_listener_refuses_a_client_that_stays_in_clear(certs: NbdTls) -> None:
    async with tls_server(ServerTls.from_dir(certs.server)) as (_, port):
        with pytest.raises(NbdOptionError, match="TLS required"):
            await connect(("127.0.0.1", port))


async def test_client_certificates_are_checked_only_when_a_ca_is_given(certs: NbdTls) -> None:
    async with tls_server(ServerTls.from_dir(certs.server)) as (backend, port):
        for refused in (certs.stranger, certs.anonymous):  # another CA's certificate, none
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await tls_read(port, certs.client_context(refused), 0, 10)
        # The server goes on serving clients that do present one.
        got = await tls_read(port, certs.client_context(certs.client), 0, 10)
        assert got == bytes(backend.data[:10])
    async with tls_server(ServerTls.from_dir(certs.server_open)) as (backend, port):
        got = await tls_read(port, certs.client_context(certs.anonymous), 0, 10)
        assert got == bytes(backend.data[:10])


async def test_a_client_that_distrusts_the_server_certificate_fails(certs: NbdTls) -> None:
    async with tls_server(ServerTls.from_dir(certs.server)) as (_, port):
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_read(port, certs.client_context(certs.distrustful), 0, 10)


async def test_unusable_tls_files_fail_the_start(certs: NbdTls, tmp_path: Path) -> None:
    with pytest.raises(TlsFilesError, match=r"server-cert\.pem: no such file"):
        ServerTls.from_dir(tmp_path)
    mismatched = ServerTls(certs.server / "server-cert.pem", certs.client / "client-key.pem")
    spec = ExportSpec("mem", SIZE)
    listener = Listener(host="127.0.0.1", port=0, tls=mismatched)
    with pytest.raises(TlsFilesError, match=r"NBD TLS: .*server-cert\.pem"):
        await serve(MemoryBackend(), spec, [listener])


def test_tls_works_under_uvloop(certs: NbdTls) -> None:
    """``tessera export`` runs on uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def main() -> None:
        async with tls_server(ServerTls.from_dir(certs.server)) as (backend, port):
            got = await tls_read(port, certs.client_context(certs.client), 4096, 70000)
            assert got == bytes(backend.data[4096:74096])
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await tls_read(port, certs.client_context(certs.stranger), 0, 10)

    uvloop.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_repository_client_speaks_tls_to_it(certs: NbdTls, loop: str) -> None:
    import uvloop

    async def main() -> None:
        tls = ServerTls.from_dir(certs.server)
        async with tls_server(tls, read_only=False) as (backend, port):
            address = ("127.0.0.1", port)
            context = certs.client_context(certs.client)
            async with await connect(address, tls=context) as client:
                reads = [client.read(o, 65536) for o in range(0, SIZE, 65536)]
                assert b"".join(await asyncio.gather(*reads)) == bytes(backend.data)
                status = await client.block_status(0, SIZE, p.BASE_ALLOCATION)
                assert [e.zero for e in status] == [False, True]
                # A write payload larger than one receive of the server, through TLS.
                payload = bytes(range(251)) * 1500
                await client.write(1000, payload)
                assert backend.data[1000 : 1000 + len(payload)] == payload
                assert await client.read(1000, len(payload)) == payload
            with pytest.raises(NbdConnectionError, match="TLS handshake failed"):
                await connect(address, tls=certs.client_context(certs.distrustful))

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


async def test_a_client_that_wants_tls_refuses_a_server_without(
    server: tuple[MemoryBackend, Path, ServerStats], certs: NbdTls
) -> None:
    _, sock, _ = server
    context = certs.client_context(certs.client)
    with pytest.raises(NbdOptionError, match="NBD_OPT_STARTTLS"):
        await connect(sock, tls=context, server_hostname="localhost")
