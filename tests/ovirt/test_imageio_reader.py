"""The imageio reader's HTTP/1.1 client (``plugins.ovirt.http11``) against real TLS servers.

A scripted server (asyncio, TLS with a lab CA certificate for 127.0.0.1) sends exactly the
bytes each test chooses: bodies in small pieces, wrong framing, errors, stalls and hang-ups,
so the reader's handling of each is seen on a real socket. The real ovirt-imageio daemon
(``ImageioDaemon``) checks keep-alive and the uvloop transport the CLI runs on.
"""

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvloop

from engine.core.units import KiB, MiB
from engine.io.qemu import QemuNbd
from plugins.lab.imageio import ImageioDaemon
from plugins.lab.tls import LabCa
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.http11 import HttpConnection
from plugins.ovirt.imageio import (
    ImageioError,
    ImageioReader,
    ImageioTicketGone,
    ImageioTransientError,
)
from tests.unit.io import leaks

TICKET = "5a1b2c3d-4e5f-4000-8000-0000000000aa"

Respond = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def data(offset: int, length: int) -> bytes:
    """The scripted disk: byte i is (i * 7 + i // 251) mod 256 (no period of a power of 2)."""
    return bytes((i * 7 + i // 251) % 256 for i in range(offset, offset + length))


def requested_range(head: bytes) -> tuple[int, int]:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "range":
            first, _, last = value.strip().removeprefix("bytes=").partition("-")
            return int(first), int(last)
    raise AssertionError(f"no Range in {head!r}")


def partial(first: int, last: int, body: bytes | None = None, extra: str = "") -> bytes:
    """A 206 head for ``first``-``last`` (and its body, the scripted disk's unless given)."""
    body = data(first, last - first + 1) if body is None else body
    head = (
        f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/*\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


@dataclass
class Server:
    """A TLS server on 127.0.0.1 that answers each request head with ``respond``."""

    respond: Respond
    ca: EngineCa
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/images/{TICKET}"

    async def seen(self, count: int) -> None:
        """Until ``count`` request heads have arrived."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: len(self.requests) >= count)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The work runs in a task of its own that teardown cancels: the handler itself must
        # end normally (Python 3.11's streams log a cancelled handler as an error).
        self.connections += 1
        work = asyncio.create_task(self._answer(reader, writer))
        self.handlers.add(work)
        try:
            await asyncio.wait([work])
        finally:
            self.handlers.discard(work)
            writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                async with self.arrived:
                    self.requests.append(head)
                    self.arrived.notify_all()
                await self.respond(head, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass


@contextlib.asynccontextmanager
async def scripted(tmp_path: Path, respond: Respond) -> AsyncIterator[Server]:
    tls = LabCa().issue(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server = Server(respond, EngineCa.from_file(tls.ca_file))
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        for task in list(server.handlers):  # Python 3.11's Server cannot close its clients
            task.cancel()
        if server.handlers:
            await asyncio.wait(server.handlers)
        await listener.wait_closed()


async def ranges(head: bytes, writer: asyncio.StreamWriter) -> None:
    """A well-behaved server: the body in pieces of 1000 bytes, drained one by one."""
    first, last = requested_range(head)
    answer = partial(first, last)
    for pos in range(0, len(answer), 1000):
        writer.write(answer[pos : pos + 1000])
        await writer.drain()


async def read(server: Server, offset: int, length: int) -> bytes:
    reader = ImageioReader(server.url, ca=server.ca)
    try:
        buf = bytearray(length)
        await reader.readinto(offset, memoryview(buf))
        return bytes(buf)
    finally:
        await reader.close()


async def test_bodies_in_small_pieces_fill_the_buffer_over_one_connection(
    tmp_path: Path,
) -> None:
    async with scripted(tmp_path, ranges) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        try:
            for offset, length in [(0, 1), (5, 4093), (MiB - 3, 64 * KiB + 7), (17, 300_001)]:
                buf = bytearray(b"\xee" * length)
                await reader.readinto(offset, memoryview(buf))
                assert buf == data(offset, length)
            assert reader.connections == 1
        finally:
            await reader.close()
    assert server.connections == 1
    assert len(server.requests) == 4
    assert server.requests[1].startswith(f"GET /images/{TICKET} HTTP/1.1\r\n".encode())
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in server.requests[1]
    assert b"Range: bytes=5-4097\r\n" in server.requests[1]


async def test_a_closed_idle_connection_is_reopened_once(tmp_path: Path) -> None:
    async def close_after_each(head: bytes, writer: asyncio.StreamWriter) -> None:
        await ranges(head, writer)
        await writer.drain()
        writer.close()  # no "Connection: close": the client learns it on its next request

    async with scripted(tmp_path, close_after_each) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        try:
            for offset in (0, 4096, 8192):
                buf = bytearray(4096)
                await reader.readinto(offset, memoryview(buf))
                assert buf == data(offset, 4096)
        finally:
            await reader.close()
    assert server.connections == 3


async def test_connection_close_is_honoured(tmp_path: Path) -> None:
    async def says_close(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        # The length said twice, alike, is one length (RFC 9110 8.6).
        length = f"Content-Length: {last - first + 1}\r\n"
        writer.write(partial(first, last, extra=f"Connection: close\r\n{length}"))

    async with scripted(tmp_path, says_close) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        try:
            for offset in (0, 100):
                buf = bytearray(100)
                await reader.readinto(offset, memoryview(buf))
                assert buf == data(offset, 100)
            assert reader.connections == 2
        finally:
            await reader.close()


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (403, ImageioTicketGone, False),
        (404, ImageioError, False),
        (503, ImageioTransientError, True),
    ],
)
async def test_an_error_status_quotes_the_body_and_the_connection_stays(
    tmp_path: Path, status: int, error: type[ImageioError], retryable: bool
) -> None:
    calls = 0

    async def fails_first(head: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            body = f"You are not allowed to access ticket {TICKET}\n".encode()
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
        else:
            await ranges(head, writer)

    async with scripted(tmp_path, fails_first) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        try:
            with pytest.raises(error) as info:
                await reader.readinto(3 * MiB, memoryview(bytearray(512)))
            buf = bytearray(512)
            await reader.readinto(3 * MiB, memoryview(buf))  # same connection, in step
            assert buf == data(3 * MiB, 512)
            assert reader.connections == 1
        finally:
            await reader.close()
    assert type(info.value) is error
    assert info.value.retryable is retryable
    message = str(info.value)
    assert f"GET 512 bytes at offset {3 * MiB}: HTTP {status}" in message
    assert f"access ticket {TICKET[:8]}…" in message
    assert TICKET not in message


async def test_a_wrong_range_or_length_is_refused_without_touching_the_buffer(
    tmp_path: Path,
) -> None:
    answers = iter(
        [
            partial(4096, 8191),  # another range than asked
            partial(0, 4095, body=data(0, 1000)),  # Content-Length short of the range
            partial(0, 4095, body=data(0, 5000)),  # longer than the range
            b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + bytes(2_000_000),
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/*\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + bytes(4096) + b"\r\n0\r\n\r\n",
            b"HTTP/1.1 2O6 Partial Content\r\n\r\n",
        ]
    )

    async def scripted_answer(head: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(next(answers))

    expected = [
        (ImageioError, "Content-Range 'bytes 4096-8191/\\*' does not match bytes 0-4095"),
        (ImageioTransientError, "short body: 1000 of 4096 bytes"),
        (ImageioError, "server sent 5000 body for the 4096 bytes"),
        (ImageioError, "HTTP 200: OK \\(a body of 2000000 bytes, not read\\)$"),
        (ImageioError, "Transfer-Encoding 'chunked' is not read"),
        (ImageioError, "not an HTTP/1.x status line"),
    ]
    async with scripted(tmp_path, scripted_answer) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        try:
            for error, match in expected:
                buf = bytearray(b"\xee" * 4096)
                with pytest.raises(error, match=match) as info:
                    await reader.readinto(0, memoryview(buf))
                assert type(info.value) is error
                assert buf == b"\xee" * 4096
        finally:
            await reader.close()
    # A refused body of known length that was read whole leaves the connection in step
    # (the first three); the 200 of 2 MB was not read on and the chunked one cannot be
    # framed: each dropped its connection, so the last two answers came on new ones.
    assert server.connections == 3


async def test_a_connection_lost_mid_body_is_transient(tmp_path: Path) -> None:
    async def hangs_up(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        writer.write(partial(first, last)[:-1000])
        await writer.drain()
        writer.transport.abort()

    async with scripted(tmp_path, hangs_up) as server:
        with pytest.raises(ImageioTransientError, match=r"closed after \d+ bytes") as info:
            await read(server, 0, 64 * KiB)
    assert info.value.retryable
    assert "GET 65536 bytes at offset 0" in str(info.value)


async def test_nothing_listening_is_transient(tmp_path: Path) -> None:
    async with scripted(tmp_path, ranges) as server:
        url, ca = server.url, server.ca
    reader = ImageioReader(url, ca=ca)
    try:
        with pytest.raises(ImageioTransientError, match="offset 0: HTTP \\(none\\)") as info:
            await reader.readinto(0, memoryview(bytearray(10)))
    finally:
        await reader.close()
    assert info.value.retryable


async def test_a_stalled_body_times_out(tmp_path: Path) -> None:
    async def stalls(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        writer.write(partial(first, last)[:-10])
        await asyncio.sleep(30)

    async with scripted(tmp_path, stalls) as server:
        conn = HttpConnection(
            server.url,
            server.ca.context(),
            connect_timeout=5,
            read_timeout=0.2,
            request_timeout=10,
        )
        try:
            view = memoryview(bytearray(1000))
            with pytest.raises(TimeoutError, match="no data from the server for"):
                await conn.request("GET", {"Range": "bytes=0-999"}, body_into=lambda head: view)
        finally:
            await conn.close()


async def test_a_cancelled_read_leaves_the_buffer_alone_afterwards(tmp_path: Path) -> None:
    """Half the body arrives, the read is cancelled, then the rest arrives: none of it may
    land in the buffer the caller has taken back."""
    half_sent = asyncio.Event()
    go_on = asyncio.Event()
    rest_sent = asyncio.Event()

    async def in_two_halves(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        answer = partial(first, last)
        writer.write(answer[: len(answer) // 2])
        await writer.drain()
        half_sent.set()
        await go_on.wait()
        with contextlib.suppress(ConnectionError):
            writer.write(answer[len(answer) // 2 :])
            await writer.drain()
        rest_sent.set()

    async with scripted(tmp_path, in_two_halves) as server:
        reader = ImageioReader(server.url, ca=server.ca)
        buf = bytearray(256 * KiB)
        try:
            task = asyncio.create_task(reader.readinto(0, memoryview(buf)))
            await half_sent.wait()
            while buf[1000:1010] != data(1000, 10):  # the first bytes are in
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            buf[:] = bytes(len(buf))  # the caller reuses its buffer
            go_on.set()
            await rest_sent.wait()
            for _ in range(20):  # loop turns: any bytes that could still arrive are handled
                await asyncio.sleep(0)
            assert buf == bytes(len(buf))
            # The reader is usable again, on a new connection.
            await reader.readinto(0, memoryview(buf)[:100])
            assert buf[:100] == data(0, 100)
            assert reader.connections == 2
        finally:
            go_on.set()
            await reader.close()


async def test_two_reads_in_flight_on_one_connection_get_their_own_responses(
    tmp_path: Path,
) -> None:
    """Pipelined: the server sees both requests before it answers either; then it sends an
    error (with a body) and the second response in one write. Each read gets its own: the
    error names the first read's offset, the data lands in the second read's buffer."""

    async def answer_both(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        if first == 0:
            return  # held: the next request is read before anything is answered
        body = b"backend failed"
        error = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        writer.write(error + partial(first, last))

    async with scripted(tmp_path, answer_both) as server:
        reader = ImageioReader(server.url, ca=server.ca, pipeline=2)
        second = bytearray(3000)
        try:
            results = await asyncio.gather(
                reader.readinto(0, memoryview(bytearray(100))),
                reader.readinto(5000, memoryview(second)),
                return_exceptions=True,
            )
            with pytest.raises(RuntimeError, match="at most 2 requests in flight"):
                await asyncio.gather(*(reader.readinto(0, memoryview(bytearray(1))) for _ in "abc"))
        finally:
            await reader.close()
    error, ok = results
    assert isinstance(error, ImageioTransientError)
    assert "at offset 0: HTTP 503" in str(error) and "backend failed" in str(error)
    assert ok is None
    assert second == data(5000, 3000)
    assert [requested_range(h)[0] for h in server.requests[:2]] == [0, 5000]
    assert reader.connections == 1


async def test_a_cancelled_read_mid_pipeline_drops_the_connection_and_the_next_is_resent(
    tmp_path: Path,
) -> None:
    """The first read is cancelled halfway through its body while the second is in flight:
    its buffer gets no more bytes, the connection is dropped, and the second request (no
    byte of its answer seen) is sent again on a new connection and completes."""
    half_sent = asyncio.Event()
    go_on = asyncio.Event()

    async def halves_then_rest(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        answer = partial(first, last)
        if first != 0 or server.connections > 1:
            writer.write(answer)
            return
        writer.write(answer[: len(answer) // 2])
        await writer.drain()
        half_sent.set()
        await go_on.wait()
        with contextlib.suppress(ConnectionError):
            writer.write(answer[len(answer) // 2 :])
            await writer.drain()

    async with scripted(tmp_path, halves_then_rest) as server:
        reader = ImageioReader(server.url, ca=server.ca, pipeline=2)
        buf, other = bytearray(256 * KiB), bytearray(1000)
        try:
            task = asyncio.create_task(reader.readinto(0, memoryview(buf)))
            await half_sent.wait()
            second = asyncio.create_task(reader.readinto(777, memoryview(other)))
            for _ in range(5):  # loop turns: the second request is written
                await asyncio.sleep(0)
            while buf[1000:1010] != data(1000, 10):  # the first bytes are in
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            buf[:] = bytes(len(buf))  # the caller reuses its buffer
            go_on.set()
            await second
            for _ in range(20):  # loop turns: any bytes that could still arrive are handled
                await asyncio.sleep(0)
            assert buf == bytes(len(buf))
            assert other == data(777, 1000)
            assert reader.connections == 2
        finally:
            go_on.set()
            await reader.close()


async def test_closing_with_reads_in_flight_fails_them_without_a_new_connection(
    tmp_path: Path,
) -> None:
    """The connection is a reused one (the case where a lost request is sent again): its
    owner's close() still ends the requests in flight."""

    async def answers_the_first(head: bytes, writer: asyncio.StreamWriter) -> None:
        first, last = requested_range(head)
        if first == 0:
            writer.write(partial(first, last))

    async with scripted(tmp_path, answers_the_first) as server:
        reader = ImageioReader(server.url, ca=server.ca, pipeline=2)
        await reader.readinto(0, memoryview(bytearray(10)))
        reads = [
            asyncio.create_task(reader.readinto(offset, memoryview(bytearray(10))))
            for offset in (10, 20)
        ]
        await server.seen(3)  # both sent
        await reader.close()
        results = await asyncio.gather(*reads, return_exceptions=True)
        assert [type(r) for r in results] == [ImageioTransientError] * 2
        assert reader.connections == 1
        assert server.connections == 1


def test_reads_under_uvloop(tmp_path: Path) -> None:
    """The CLI's loop: uvloop's TLS transport (not an asyncio.Transport) fills the view."""

    async def main() -> None:
        async with scripted(tmp_path, ranges) as server:
            reader = ImageioReader(server.url, ca=server.ca)
            try:
                for offset in (0, 12345):
                    buf = bytearray(200 * KiB + 1)
                    await reader.readinto(offset, memoryview(buf))
                    assert buf == data(offset, len(buf))
                assert reader.connections == 1
            finally:
                await reader.close()

    uvloop.run(main())


# --- the real ovirt-imageio daemon -----------------------------------------------------------


@pytest.fixture
def nothing_left_behind() -> Iterator[None]:
    before = leaks.children()
    yield
    assert leaks.children() <= before


@pytest.mark.integration
@pytest.mark.usefixtures("nothing_left_behind")
def test_the_daemon_keeps_the_connection_under_uvloop(tmp_path: Path) -> None:
    size = 4 * MiB
    image = tmp_path / "disk.raw"
    content = data(0, size)
    image.write_bytes(content)

    async def main() -> None:
        async with (
            ImageioDaemon(tmp_path) as daemon,
            QemuNbd(image, "raw", read_only=True) as nbd,
        ):
            await daemon.add_ticket(TICKET, f"nbd:unix:{nbd.address}", size, ["read"])
            reader = ImageioReader(daemon.data_url(TICKET), ca=EngineCa.from_file(daemon.ca_file))
            out = bytearray(size)
            try:
                # Odd sizes and offsets, the last one ending at the disk's end.
                cuts = [0, 1, 4096, 70_000, MiB, 3 * MiB + 5, size]
                for first, end in itertools.pairwise(cuts):
                    with memoryview(out)[first:end] as view:
                        await reader.readinto(first, view)
                assert reader.connections == 1
                with pytest.raises(ImageioError, match="HTTP 416"):
                    await reader.readinto(size - 10, memoryview(bytearray(20)))
                # Still in step after the error.
                await reader.readinto(0, memoryview(out)[:10])
            finally:
                await reader.close()
            await daemon.remove_ticket(TICKET)
            assert out == content

    uvloop.run(main())


@pytest.mark.integration
@pytest.mark.usefixtures("nothing_left_behind")
def test_the_daemon_answers_pipelined_reads_in_order(tmp_path: Path) -> None:
    """Two lanes read one connection (as the backup's lanes do), with pieces of odd sizes:
    every response lands in the buffer of the read that asked for it."""
    size = 4 * MiB
    image = tmp_path / "disk.raw"
    content = data(0, size)
    image.write_bytes(content)

    async def main() -> None:
        async with (
            ImageioDaemon(tmp_path) as daemon,
            QemuNbd(image, "raw", read_only=True) as nbd,
        ):
            await daemon.add_ticket(TICKET, f"nbd:unix:{nbd.address}", size, ["read"])
            ca = EngineCa.from_file(daemon.ca_file)
            reader = ImageioReader(daemon.data_url(TICKET), ca=ca, pipeline=2)
            out = bytearray(size)
            cuts = [0, 1, 4096, 70_000, 300_001, MiB, MiB + 17, 2 * MiB, 3 * MiB + 5, size]
            pieces = iter(itertools.pairwise(cuts))

            async def lane() -> None:
                for first, end in pieces:
                    with memoryview(out)[first:end] as view:
                        await reader.readinto(first, view)

            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(2):
                        tg.create_task(lane())
                assert reader.connections == 1
            finally:
                await reader.close()
            await daemon.remove_ticket(TICKET)
            assert out == content

    uvloop.run(main())
