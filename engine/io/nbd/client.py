"""asyncio NBD client: one connection, pipelined requests, reads straight into caller buffers.

``connect()`` opens a unix socket or TCP connection, runs the handshake and returns an
``NbdClient``; ``close()`` (or leaving ``async with``) waits for requests in flight, sends
NBD_CMD_DISC and closes. Any number of tasks may call one client at once: requests are
pipelined (at most ``MAX_IN_FLIGHT`` on the wire) and replies matched by cookie.

Reads and writes larger than ``max_request`` are split and pipelined; ``readinto`` receives
payload bytes from the socket directly into the caller's buffer (``asyncio.BufferedProtocol``),
so a CpuPool slot can be filled without a copy. Bounds, alignment to ``block_size.minimum``
and export size are the server's to check: a violation comes back as ``NbdRequestError``
(EINVAL). The caller's buffer is written only until the call returns or is cancelled.

Raised: ``NbdRequestError`` (the server failed a request; ``NbdTransientRequestError`` when a
retry may help), ``NbdConnectionError`` (cannot connect, or the connection broke: every
request in flight and every later one fails), ``NbdProtocolError`` (the server broke the
protocol; the connection is dropped), ``NbdOptionError`` (the export was refused), and
ValueError for arguments that can never work (an unnegotiated context, WRITE_ZEROES or FLUSH
on a server that does not offer them).
"""

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Final

from engine.core.extent import Extent
from engine.core.units import GiB
from engine.io.nbd import protocol as p
from engine.io.nbd.connection import Connection, copy_error
from engine.io.nbd.errors import (
    NbdConnectionError,
    request_error,
)
from engine.io.nbd.handshake import BlockSize, ExportInfo, Handshake
from engine.io.nbd.transmission import Command

Address = str | os.PathLike[str] | tuple[str, int]

# Connect plus handshake: a local qemu-nbd answers in milliseconds, a remote server within a
# few seconds; a server that accepts and then says nothing must not hang a job.
CONNECT_TIMEOUT: Final = 30.0
# close(): time for replies in flight to arrive and for the server to hang up after DISC;
# after that the connection is dropped hard.
CLOSE_TIMEOUT: Final = 10.0
# The request length field is 32 bits and qemu-nbd caps zeroing just under 2 GiB; a huge zero
# request would also hold up the reads queued behind it.
MAX_ZERO_REQUEST: Final = 1 * GiB
# One BLOCK_STATUS request covers at most this much: fits the 32-bit length, and bounds the
# extents of a badly fragmented image held in memory at once.
MAX_STATUS_LENGTH: Final = 2 * GiB


def describe(address: Address) -> str:
    """How errors and logs name a server: ``unix:/run/x.sock`` or ``host:port``."""
    if isinstance(address, tuple):
        host, port = address
        return f"{host}:{port}"
    return f"unix:{os.fspath(address)}"


@dataclass(frozen=True, slots=True)
class _Piece:
    """One request of a (possibly split) operation."""

    kind: int
    offset: int
    length: int
    flags: int = 0
    buf: memoryview | None = None
    payload: memoryview | None = None


@dataclass(frozen=True, slots=True)
class _Sent:
    command: Command
    waiter: asyncio.Future[Command]


class NbdClient:
    """A connected NBD export. Build with ``connect()``; safe to share between tasks."""

    def __init__(self, connection: Connection, info: ExportInfo) -> None:
        self._conn = connection
        self._info = info
        self._contexts = MappingProxyType(dict(info.contexts))
        bs = info.block_size
        largest = min(p.MAX_REQUEST, bs.maximum)
        self._max_request = max(bs.minimum, largest - largest % bs.minimum)
        self._max_zero = MAX_ZERO_REQUEST - MAX_ZERO_REQUEST % bs.minimum
        self._closed = False

    # --- facts -----------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return self._conn.server

    @property
    def export_name(self) -> str:
        return self._info.name

    @property
    def export_size(self) -> int:
        return self._info.size

    @property
    def block_size(self) -> BlockSize:
        return self._info.block_size

    @property
    def max_request(self) -> int:
        """Largest READ or WRITE sent as one request; larger calls are split."""
        return self._max_request

    @property
    def read_only(self) -> bool:
        return self._info.read_only

    @property
    def can_flush(self) -> bool:
        return self._info.can_flush

    @property
    def can_zero(self) -> bool:
        return self._info.can_zero

    @property
    def can_multi_conn(self) -> bool:
        return self._info.can_multi_conn

    @property
    def structured(self) -> bool:
        return self._info.structured

    @property
    def contexts(self) -> Mapping[str, int]:
        """Negotiated metadata contexts: name → id. A requested name may be missing."""
        return self._contexts

    # --- I/O -------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (one copy more than ``readinto``)."""
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return bytes(buf)

    async def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` with the bytes at ``offset``; the payload is received straight into it.

        On an error or cancellation ``buf`` holds partial data and is no longer written to.
        """
        view = _bytes_view(buf)
        step = self._max_request
        await self._run(
            _Piece(p.CMD_READ, offset + pos, n, buf=view[pos : pos + n])
            for pos, n in _split(len(view), step)
        )

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``; it must stay unchanged until this returns."""
        view = _bytes_view(data)
        step = self._max_request
        await self._run(
            _Piece(p.CMD_WRITE, offset + pos, n, payload=view[pos : pos + n])
            for pos, n in _split(len(view), step)
        )

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zeroes; ``no_hole`` keeps it allocated."""
        if not self.can_zero:
            raise ValueError(f"NBD server {self.server} does not offer WRITE_ZEROES")
        flags = p.CMD_FLAG_NO_HOLE if no_hole else 0
        await self._run(
            _Piece(p.CMD_WRITE_ZEROES, offset + pos, n, flags=flags)
            for pos, n in _split(length, self._max_zero)
        )

    async def flush(self) -> None:
        """Make every completed write durable on the server."""
        if not self.can_flush:
            raise ValueError(f"NBD server {self.server} does not offer FLUSH")
        await self._run([_Piece(p.CMD_FLUSH, 0, 0)])

    async def block_status(
        self, offset: int, length: int, context: str = p.BASE_ALLOCATION
    ) -> list[Extent]:
        """Extents of ``context`` from ``offset``, merged and clipped to the range.

        One request: the answer may cover less than ``length`` (servers answer short, and at
        most ``MAX_STATUS_LENGTH`` is asked), never more. ``extents()`` covers a whole range.
        """
        context_id = self._contexts.get(context)
        if context_id is None:
            raise ValueError(
                f"metadata context {context!r} was not negotiated with {self.server} "
                f"(negotiated: {sorted(self._contexts)})"
            )
        if length <= 0:
            return []
        length = min(length, MAX_STATUS_LENGTH)
        (command,) = await self._run([_Piece(p.CMD_BLOCK_STATUS, offset, length)])
        return p.to_extents(context, offset, length, command.statuses[context_id])

    # --- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for requests in flight, send NBD_CMD_DISC, close. Idempotent, bounded."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        conn.closing = True  # no new requests; those in flight finish
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await conn.idle.wait()  # spec: SHOULD wait until no requests are in flight
                conn.disconnect()
                await asyncio.shield(conn.closed)
        except TimeoutError:
            pass  # dropped hard below
        finally:
            if not conn.closed.done():
                assert conn.transport is not None
                conn.transport.abort()

    async def __aenter__(self) -> "NbdClient":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------------

    async def _run(self, pieces: Iterable[_Piece]) -> list[Command]:
        """Send every piece (pipelined), then wait for all; raise the first failure."""
        sent: list[_Sent] = []
        try:
            for piece in pieces:
                sent.append(await self._send(piece))
                if piece.payload is not None:
                    await self._conn.drain()
            return [await self._wait(s) for s in sent]
        finally:
            for s in sent:
                # A cancelled waiter (our task was cancelled while awaiting it) has not seen
                # its reply either: both kinds are abandoned.
                if s.waiter.cancelled() or not s.waiter.done():
                    self._abandon(s)
                else:
                    s.waiter.exception()  # retrieved: the first failure was raised already

    async def _send(self, piece: _Piece) -> _Sent:
        conn = self._conn
        conn.check()
        await conn.slots.acquire()
        try:
            transmission = conn.check()
            command, header = transmission.request(
                piece.kind, piece.offset, piece.length, flags=piece.flags, buf=piece.buf
            )
        except BaseException:
            conn.slots.release()
            raise
        waiter: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        conn.register(command.cookie, waiter)
        conn.send(header)
        if piece.payload is not None:
            conn.send(piece.payload)
        return _Sent(command, waiter)

    async def _wait(self, sent: _Sent) -> Command:
        command = await sent.waiter
        failure = command.failure
        if failure is not None:
            raise request_error(
                server=self.server,
                command=command.name,
                offset=command.offset,
                length=command.length,
                errno=failure.errno,
                message=failure.message,
                error_offset=failure.offset,
            )
        return command

    def _abandon(self, sent: _Sent) -> None:
        # The reply may still come: the parser keeps the cookie but drops the payload, so the
        # caller's buffer is not written after the caller gave up.
        if self._conn.transmission is not None:
            self._conn.transmission.abandon(sent.command)
        sent.waiter.cancel()


def _split(length: int, step: int) -> list[tuple[int, int]]:
    """(position, size) pieces of at most ``step`` bytes covering ``length``."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    return [(pos, min(step, length - pos)) for pos in range(0, length, step)]


def _bytes_view(buf: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


async def connect(
    address: Address,
    export_name: str = "",
    meta_contexts: Sequence[str] = (p.BASE_ALLOCATION,),
    *,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> NbdClient:
    """Connect to ``address`` (unix socket path or ``(host, port)``) and open the export.

    ``tls``: upgrade with NBD_OPT_STARTTLS before any other option and check the server with
    this client context (its CA, and the host's name or ``server_hostname``: needed for a
    unix socket when the context checks names); a server that refuses is NbdOptionError, a
    failed TLS handshake NbdConnectionError. Nothing is ever sent in clear after asking.

    ``meta_contexts`` are asked for with NBD_OPT_SET_META_CONTEXT: ``base:allocation`` and
    ``qemu:dirty-bitmap:NAME`` are understood (ValueError for others). A server may select
    fewer than asked (a missing bitmap is simply absent): check ``client.contexts``.
    Raises NbdConnectionError (cannot connect, or no handshake within ``CONNECT_TIMEOUT``),
    NbdOptionError (export refused), NbdProtocolError. The caller closes the client.
    """
    handshake = Handshake(export_name, meta_contexts, tls=tls is not None)
    server = describe(address)
    loop = asyncio.get_running_loop()
    conn = Connection(handshake, server)
    connected = False
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            try:
                if isinstance(address, tuple):
                    host, port = address
                    await loop.create_connection(lambda: conn, host, port)
                else:
                    await loop.create_unix_connection(lambda: conn, os.fspath(address))
            except OSError as e:
                raise NbdConnectionError(server=server, reason=f"cannot connect: {e}") from e
            if tls is not None:
                hostname = address[0] if isinstance(address, tuple) else server_hostname
                await _start_tls(conn, tls, hostname)
            info = await conn.ready
            connected = True
    except TimeoutError as e:
        raise NbdConnectionError(
            server=server, reason=f"no NBD handshake within {CONNECT_TIMEOUT:.0f} s"
        ) from e
    finally:
        if not connected:
            # Nobody will await the handshake any more: cancel it so a late failure is not
            # left unretrieved, and drop the half-open connection.
            conn.ready.cancel()
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
    return NbdClient(conn, info)


async def _start_tls(conn: Connection, tls: ssl.SSLContext, hostname: str | None) -> None:
    await conn.tls_wanted
    if conn.error is not None:
        raise copy_error(conn.error)
    assert conn.transport is not None
    loop = asyncio.get_running_loop()
    try:
        # Bounded by connect()'s CONNECT_TIMEOUT, like the rest of the handshake.
        transport = await loop.start_tls(conn.transport, conn, tls, server_hostname=hostname)
    except (OSError, ssl.SSLError) as e:
        raise NbdConnectionError(server=conn.server, reason=f"TLS handshake failed: {e}") from e
    if transport is None:
        raise NbdConnectionError(server=conn.server, reason="the connection closed during TLS")
    conn.tls_started(transport)


async def extents(
    client: NbdClient, offset: int, length: int, context: str = p.BASE_ALLOCATION
) -> AsyncIterator[Extent]:
    """Every extent of ``[offset, offset + length)``, asking again where the server stopped.

    Extents are merged across requests (neighbours always differ in flags) and clipped to
    the range; the range must lie within the export (ValueError otherwise).
    """
    end = offset + length
    if offset < 0 or length < 0 or end > client.export_size:
        raise ValueError(
            f"range [{offset}, {end}) is outside the export of {client.export_size} bytes"
        )
    pending: Extent | None = None
    pos = offset
    while pos < end:
        for extent in await client.block_status(pos, end - pos, context):
            if pending is not None and pending.same_flags(extent):
                pending = Extent(
                    pending.start,
                    pending.length + extent.length,
                    pending.zero,
                    pending.hole,
                    pending.dirty,
                )
                continue
            if pending is not None:
                yield pending
            pending = extent
        assert pending is not None  # block_status answers at least one extent
        pos = pending.end
    if pending is not None:
        yield pending
