"""asyncio NBD server: the ``server.ServerConnection`` machine over unix sockets or TCP.

::

    listener ──accept──► connection task (one per client, all in the server's TaskGroup)
                           reader loop: recv → machine → events
                             Request ──► request task (≤ MAX_IN_FLIGHT per connection)
                                           backend.read/write/... → reply buffers →
                                           transport (one write per reply: replies of
                                           different requests never interleave mid-chunk)
                             Disconnect ──► wait for the request tasks, close

Replies go out in the order requests finish, which NBD allows. A connection whose client
vanishes (reset, closed mid-read) ends alone: its request tasks are cancelled and the server
goes on serving the others. A backend error becomes that request's error reply (EIO, with
the error's text when structured replies are on) and is logged; the connection lives on.

``serve(backend, spec, listeners)`` runs until cancelled (the CLI cancels it on SIGINT or
SIGTERM); then it stops accepting, cancels every connection and waits for them. Unix
sockets are created mode 0600 (and removed on exit); TCP listens on the address given only.

TLS: a listener with ``tls`` (``tls.ServerTls``) requires it of every client (the machine's
FORCEDTLS mode: options other than STARTTLS are refused until TLS runs). On ``StartTls``::

    reader loop ── StartTls ──► transport.pause_reading()      no byte from the client is
                                send the ACK (in clear)          read in clear after STARTTLS
                                StreamWriter.start_tls()  ──►  loop.start_tls(server_side):
                                                                 the handshake; the client's
                                                                 certificate checked against
                                                                 the CA when one is given
                                machine.tls_started()          the loop reads again, over TLS

A plaintext byte already buffered when STARTTLS is answered ends the connection (it would
otherwise be read as if it came through TLS: the STARTTLS injection of CVE-2011-0411). A
failed or slow handshake (``TLS_HANDSHAKE_TIMEOUT``) ends that connection only.
"""

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, runtime_checkable

import structlog

from engine.core.errors import EngineError
from engine.core.units import KiB
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import EIO, NbdProtocolError
from engine.io.nbd.server import (
    Buffer,
    Disconnect,
    ExportSpec,
    Piece,
    Ready,
    Request,
    ServerConnection,
    StartTls,
)
from engine.io.nbd.tls import ServerTls
from engine.util.tasks import leaves

log = structlog.get_logger("tessera.nbd.server")

# Requests of one connection served at once; more wait in the socket (the client's own
# limit is usually 16 or 64). Bounds memory: each may hold a 32 MiB read.
MAX_IN_FLIGHT: Final = 16
# Bytes received per read call while no write payload is expected.
RECV_SIZE: Final = 256 * KiB
# How long connections get to finish what they are sending when the server stops.
CLOSE_TIMEOUT: Final = 5.0
# How long a client gets for its TLS handshake after STARTTLS was acknowledged: a client
# that stalls there must not hold a connection (and its task) forever.
TLS_HANDSHAKE_TIMEOUT: Final = 30.0


class Backend(Protocol):
    """What the server serves: one disk. Methods run on the event loop; they may await.

    Errors: raise an ``EngineError`` (answered EIO with its text) or ``OSError`` (answered
    with its errno when it is one NBD knows, else EIO).
    """

    async def read(self, offset: int, length: int) -> list[Piece]:
        """Pieces (data, holes) covering ``[offset, offset + length)`` in order."""
        ...

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation descriptors (length, STATE_* flags) from ``offset``; at least
        one, they may stop short of ``length``."""
        ...

    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None: ...

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Listener:
    """Where to listen: a unix socket ``path``, or TCP ``host``:``port`` (0: any free);
    ``tls``: every client must upgrade to TLS with these files (module docstring)."""

    path: Path | None = None
    host: str | None = None
    port: int = 0
    tls: ServerTls | None = None

    def describe(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


_NBD_ERRNOS: Final = frozenset({1, 5, 12, 22, 28, 75, 95, 108})


class _Connection:
    """One client: the reader loop and its request tasks."""

    def __init__(
        self,
        backend: Backend,
        spec: ExportSpec,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stats: "ServerStats",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.backend = backend
        self.tls = tls
        self.machine = ServerConnection(
            {"": spec, spec.name: spec}, [spec.name], tls=tls is not None
        )
        self.reader = reader
        self.writer = writer
        self.stats = stats
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        peer = writer.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix client"

    async def run(self) -> None:
        self._send([self.machine.data_to_send()])
        try:
            async with asyncio.TaskGroup() as tg:
                await self._receive(tg)
            await self.writer.drain()
        except* (ConnectionError, NbdProtocolError, OSError) as group:
            # The client vanished (reset, closed mid-reply) or spoke garbage: this
            # connection ends, its other requests are cancelled, the server goes on.
            reason = "; ".join(sorted({str(e) for e in leaves(group)}))
            log.info("nbd.connection.lost", peer=self.peer, reason=reason)
        except* Exception as group:
            # A fault of ours (a bug): said loudly, with its traceback; this connection
            # ends and the server goes on serving the others.
            for error in leaves(group):
                log.exception(
                    "nbd.connection.fault", peer=self.peer, error=repr(error), exc_info=error
                )
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self.writer.wait_closed()
            self.stats.connections_open -= 1

    async def _receive(self, tg: asyncio.TaskGroup) -> None:
        while True:
            data = await self.reader.read(max(RECV_SIZE, self.machine.expecting))
            if not data:
                return  # the client went away without NBD_CMD_DISC
            events = self.machine.receive_data(data)
            if events and isinstance(events[-1], StartTls):
                # It comes alone, before transmission: _start_tls sends the ACK itself.
                await self._start_tls()
                continue
            self._send([self.machine.data_to_send()])  # replies the machine made itself
            for event in events:
                if isinstance(event, Disconnect):
                    log.debug("nbd.disconnect", peer=self.peer, reason=event.reason)
                    return
                if isinstance(event, Ready):
                    log.info(
                        "nbd.connection.ready",
                        peer=self.peer,
                        structured=event.structured,
                        allocation=event.allocation,
                        tls=self.machine.tls,
                    )
                elif isinstance(event, Request):
                    await self.slots.acquire()  # back-pressure: stop reading at the limit
                    tg.create_task(self._serve(event))
            await self.writer.drain()

    async def _start_tls(self) -> None:
        """Answer STARTTLS and run the TLS handshake (module docstring). The machine accepts
        no bytes after STARTTLS, so it is the last event, and no request is in flight (the
        handshake comes before transmission)."""
        assert self.tls is not None
        # Paused before the ACK goes out: whatever the client sends after reading it is TLS,
        # and must reach the TLS layer, not this stream's buffer.
        transport = self.writer.transport
        if not isinstance(transport, _Pausable):  # uvloop's are not asyncio.ReadTransport
            raise TypeError(f"cannot pause reading on {transport!r}")
        transport.pause_reading()
        if _buffered(self.reader):
            raise NbdProtocolError(
                reason="client sent data after NBD_OPT_STARTTLS before its reply"
            )
        self._send([self.machine.data_to_send()])
        await self.writer.start_tls(self.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.machine.tls_started()
        tls = self.writer.get_extra_info("ssl_object")
        peer_cert = tls.getpeercert() if tls is not None else None
        log.info(
            "nbd.connection.tls",
            peer=self.peer,
            version=tls.version() if tls is not None else None,
            client=_subject(peer_cert) if peer_cert else None,
        )

    async def _serve(self, request: Request) -> None:
        try:
            reply = await self._answer(request)
        except asyncio.CancelledError:
            raise
        except (EngineError, OSError) as e:
            errno = e.errno if isinstance(e, OSError) and e.errno in _NBD_ERRNOS else EIO
            log.warning(
                "nbd.request.failed",
                peer=self.peer,
                command=request.name,
                offset=request.offset,
                length=request.length,
                error=str(e),
            )
            reply = self.machine.reply_error(request, errno or EIO, str(e))
        finally:
            self.slots.release()
        self._send(reply)
        await self.writer.drain()

    async def _answer(self, request: Request) -> list[Buffer]:
        kind, backend, machine = request.kind, self.backend, self.machine
        if kind == p.CMD_READ:
            pieces = await backend.read(request.offset, request.length)
            self.stats.bytes_read += request.length
            return machine.reply_read(request, pieces)
        if kind == p.CMD_BLOCK_STATUS:
            status = await backend.block_status(request.offset, request.length)
            return machine.reply_block_status(request, status)
        if kind == p.CMD_WRITE:
            assert request.data is not None
            await backend.write(request.offset, request.data, request.fua)
            self.stats.bytes_written += request.length
        elif kind in (p.CMD_WRITE_ZEROES, p.CMD_TRIM):
            # A trim reads back as zeroes here: the overlay records it like a zeroing.
            await backend.write_zeroes(request.offset, request.length, request.fua)
        elif kind == p.CMD_FLUSH:
            await backend.flush()
        return machine.reply_ok(request)

    def _send(self, buffers: Sequence[Buffer]) -> None:
        if not self.writer.is_closing():
            self.writer.writelines([b for b in buffers if b])


@runtime_checkable
class _Pausable(Protocol):
    def pause_reading(self) -> None: ...


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received but not yet read. StreamReader has no public way to ask; its buffer is
    the ``_buffer`` bytearray in every CPython release that has ``StreamWriter.start_tls``."""
    buffer = getattr(reader, "_buffer", None)
    if not isinstance(buffer, bytearray):
        raise TypeError("asyncio.StreamReader has no _buffer: cannot start TLS safely")
    return len(buffer)


def _subject(cert: "dict[str, object]") -> str:
    """A peer certificate's subject as ``CN=x,O=y`` (for the log)."""
    parts = []
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts)


@dataclass
class ServerStats:
    connections: int = 0
    connections_open: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


async def serve(
    backend: Backend,
    spec: ExportSpec,
    listeners: Sequence[Listener],
    *,
    ready: "asyncio.Future[list[str]] | None" = None,
    stats: ServerStats | None = None,
) -> None:
    """Serve ``backend`` as ``spec`` on ``listeners`` until cancelled (module docstring).

    ``ready`` gets the addresses listened on (a TCP port 0 resolved) once clients can
    connect. Raises OSError when a listener cannot be opened (address in use, no such
    directory); a unix socket path that exists is refused, not replaced.
    """
    stats = stats if stats is not None else ServerStats()
    connections: set[asyncio.Task[None]] = set()
    # Made before anything listens: a bad file fails the start, not each connection.
    contexts = [listener.tls.context() if listener.tls else None for listener in listeners]

    def accept(tls: ssl.SSLContext | None) -> "asyncio.streams._ClientConnectedCallback":
        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            stats.connections += 1
            stats.connections_open += 1
            try:
                await _Connection(backend, spec, reader, writer, stats, tls).run()
            except asyncio.CancelledError:
                # Only the server's stop cancels a connection task; ending it normally keeps
                # asyncio's stream callback from logging the cancelled task as an error.
                pass
            finally:
                connections.discard(task)

        return accepted

    servers: list[asyncio.Server] = []
    addresses: list[str] = []
    made: list[Path] = []
    try:
        for listener, tls in zip(listeners, contexts, strict=True):
            server, address = await _listen(listener, accept(tls), made)
            servers.append(server)
            addresses.append(address)
        if ready is not None and not ready.done():
            ready.set_result(addresses)
        log.info("nbd.serving", export=spec.name, size=spec.size, listen=addresses)
        await asyncio.Event().wait()  # until cancelled
    finally:
        for server in servers:
            server.close()
        for task in list(connections):
            task.cancel()
        if connections:
            await asyncio.wait(list(connections), timeout=CLOSE_TIMEOUT)
        for path in made:
            with contextlib.suppress(OSError):
                path.unlink()


async def _listen(
    listener: Listener,
    accepted: "asyncio.streams._ClientConnectedCallback",
    made: list[Path],
) -> tuple[asyncio.Server, str]:
    if listener.path is not None:
        path = listener.path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Created 0600 from the start: no window in which another user may connect.
            old = os.umask(0o177)
            try:
                sock.bind(os.fspath(path))
            finally:
                os.umask(old)
            made.append(path)
            server = await asyncio.start_unix_server(accepted, sock=sock, limit=RECV_SIZE)
        except BaseException:
            sock.close()
            raise
        return server, f"unix:{path}"
    server = await asyncio.start_server(
        accepted, listener.host, listener.port, limit=RECV_SIZE, reuse_address=True
    )
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"{host}:{port}"
