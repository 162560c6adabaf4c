"""The asyncio side of one NBD connection: a BufferedProtocol driving the sans-IO machines.

``Connection`` runs the ``Handshake`` until ``ready`` resolves, then hands every received byte
range to the ``Transmission`` parser, which names the memory to receive into (header scratch
or the READ's own buffer). Finished commands resolve the futures ``NbdClient`` registered; a
failure (protocol error, lost connection) fails all of them and every later request, each
with its own copy of the error. ``slots`` bounds the requests in flight: a slot is taken
before a request is sent and given back when its reply (or the connection's end) arrives,
also for requests whose caller was cancelled.

With TLS, the handshake stops after STARTTLS's ACK: reading is paused (nothing the server
sends next may be read in clear) and ``tls_wanted`` resolves (also when the connection
fails first: then ``error`` is set); ``connect`` upgrades the
transport (``loop.start_tls``, this protocol kept) and calls ``tls_started``.
"""

import asyncio
import os
from typing import Final, cast

from engine.core.units import KiB
from engine.io.nbd.errors import ESHUTDOWN, NbdConnectionError, NbdError
from engine.io.nbd.handshake import ExportInfo, Handshake
from engine.io.nbd.transmission import Command, Transmission

# qemu-nbd serves at most 16 requests of one client at a time (MAX_NBD_REQUESTS); more only
# wait in socket buffers, holding their memory.
MAX_IN_FLIGHT: Final = 16
# Receive buffer during the handshake; option replies are a few hundred bytes.
HANDSHAKE_BUFFER: Final = 4 * KiB

SHUTDOWN_REASON: Final = "the server is shutting down (it answered ESHUTDOWN)"


def copy_error(error: NbdError) -> NbdError:
    # One failure reaches many awaiting tasks; each gets its own instance (and traceback).
    return type(error)(**error.fields)


class Connection(asyncio.BufferedProtocol):
    """The protocol object: runs the state machines and wakes the tasks waiting on replies."""

    def __init__(self, handshake: Handshake, server: str) -> None:
        loop = asyncio.get_running_loop()
        self.server = server
        self.handshake = handshake
        self.transmission: Transmission | None = None
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[ExportInfo] = loop.create_future()
        self.tls_wanted: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: NbdError | None = None
        self.closing = False
        self.shutting_down = False  # the server answered ESHUTDOWN
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.idle = asyncio.Event()
        self.idle.set()
        self._waiters: dict[int, asyncio.Future[Command]] = {}
        self._scratch = bytearray(HANDSHAKE_BUFFER)
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._fd: int | None = None  # a plain socket's descriptor, for ``send``

    # --- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            self._fd = sock.fileno()

    def send(self, data: bytes | memoryview) -> None:
        """``transport.write(data)``, in order after anything the transport holds.

        When the transport holds nothing, a plain socket gets the bytes with ``os.write``,
        which releases the GIL around the syscall. uvloop's ``write`` makes the same syscall
        with the GIL held, and the syscall wakes the NBD server, which often takes this
        core at once: measured on a qcow2 backup, 10-15 µs of CPU but 26-66 µs of wall time
        per request header with the GIL held, most of it spent preempted, while every other
        thread of the process waited for the GIL. What ``os.write`` leaves (a full socket
        buffer, an error) goes to the transport, which queues it or reports the error its
        own way (``connection_lost``)."""
        transport = self.transport
        assert transport is not None
        fd = self._fd
        if fd is not None and not transport.get_write_buffer_size() and not transport.is_closing():
            try:
                sent = os.write(fd, data)
            except OSError:  # EAGAIN, or an error the transport meets and reports as well
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.transmission is None or self.error is not None:
            return memoryview(self._scratch)
        return self.transmission.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return  # the transport is being aborted; what is left on the wire is moot
        try:
            if self.transmission is None:
                self._handshake_data(nbytes)
            else:
                for command in self.transmission.buffer_updated(nbytes):
                    self._complete(command)
        except NbdError as e:
            self.fail(e)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.shutting_down:
            reason = SHUTDOWN_REASON
        elif self.closing:
            reason = "the connection was closed by the client"
        elif exc is not None:
            reason = f"connection lost: {exc}"
        elif self.transmission is None:
            reason = "the server closed the connection during the handshake"
        else:
            reason = "the server closed the connection"
        self.fail(NbdConnectionError(server=self.server, reason=reason))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # --- handshake and replies -------------------------------------------------------------

    def _handshake_data(self, nbytes: int) -> None:
        assert self.transport is not None
        self.handshake.receive_data(memoryview(self._scratch)[:nbytes])
        out = self.handshake.data_to_send()
        if out:
            self.transport.write(out)
        if self.handshake.starting_tls and not self.tls_wanted.done():
            self.transport.pause_reading()
            self.tls_wanted.set_result(None)
        if self.handshake.done:
            info = self.handshake.info
            self.transmission = Transmission(
                structured=info.structured, context_ids=info.contexts.values()
            )
            if not self.ready.done():
                self.ready.set_result(info)

    def tls_started(self, transport: asyncio.Transport) -> None:
        """``transport`` (TLS over the old one) carries the rest of the handshake."""
        self.transport = transport
        self._fd = None  # bytes go through TLS now, never straight to the socket
        self.handshake.tls_started()
        transport.write(self.handshake.data_to_send())

    def register(self, cookie: int, waiter: asyncio.Future[Command]) -> None:
        self._waiters[cookie] = waiter
        self.idle.clear()

    def _complete(self, command: Command) -> None:
        waiter = self._waiters.pop(command.cookie, None)
        if waiter is None:
            return
        self.slots.release()
        if not waiter.done():
            waiter.set_result(command)
        if command.failure is not None and command.failure.errno == ESHUTDOWN:
            # Spec: a client that receives ESHUTDOWN MUST initiate a soft disconnect.
            self.shutting_down = True
        if not self._waiters:
            self.idle.set()
            if self.shutting_down and not self.closing:
                self.disconnect()

    def disconnect(self) -> None:
        """Soft disconnect: NBD_CMD_DISC, then close once the transport has flushed it."""
        self.closing = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.transmission is not None and self.error is None:
            self.transport.write(self.transmission.disconnect())
        self.transport.close()

    def fail(self, error: NbdError) -> None:
        """The connection is unusable: fail everything waiting on it and drop it."""
        if self.error is None:
            self.error = error
        for waiter in self._waiters.values():
            self.slots.release()
            if not waiter.done():
                waiter.set_exception(copy_error(self.error))
        self._waiters.clear()
        self.idle.set()
        if not self.ready.done():
            self.ready.set_exception(copy_error(self.error))
        if not self.tls_wanted.done():
            self.tls_wanted.set_result(None)  # the waiter finds ``error`` set
        self._wake_writers()
        if self.transport is not None:
            self.transport.abort()

    def check(self) -> Transmission:
        """The transmission, or raise why no request can be sent now."""
        if self.error is not None:
            raise copy_error(self.error)
        if self.closing or self.shutting_down:
            reason = SHUTDOWN_REASON if self.shutting_down else "the client is closed"
            raise NbdConnectionError(server=self.server, reason=reason)
        assert self.transmission is not None
        assert self.transport is not None
        return self.transmission

    # --- flow control ----------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark.

        Raises only if the connection failed: a request already written still gets its
        reply after ``close()`` began.
        """
        if self._write_paused and self.error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._drain_waiters:
                    self._drain_waiters.remove(waiter)
        if self.error is not None:
            raise copy_error(self.error)

    def _wake_writers(self) -> None:
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
