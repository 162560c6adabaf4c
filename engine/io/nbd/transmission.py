"""The transmission phase as a sans-IO state machine: requests in flight and the reply parser.

``Transmission.request()`` registers a command and returns its header bytes (the caller sends
them, followed by a WRITE's data). Bytes from the server go in one of two ways:

- ``get_buffer()`` / ``buffer_updated(n)``: the parser names the exact memory the next bytes
  belong in, and the caller receives into it (this is ``asyncio.BufferedProtocol``'s
  contract). Header bytes land in a small scratch buffer, read payloads straight in the
  ``buf`` the READ was registered with: no copy between the socket and the caller's buffer.
  The view returned is only valid until the next ``buffer_updated()``.
- ``receive_data(data)``: copies arbitrary fragments through the same path (tests, streams).

Both return the commands that finished: ``failure`` is set when the server sent an error, and
a BLOCK_STATUS carries ``statuses`` (context id → (length, flags) descriptors). Anything the
protocol forbids raises ``NbdProtocolError``; the parser is then dead and every later call
raises again (the connection must be dropped).

A command whose caller went away (cancelled) must stay registered until its reply arrives, or
the reply could not be told from garbage: ``abandon()`` keeps it but sends the rest of its
payload to a discard buffer, so the caller's buffer is never written after it gave up.

(Longer than most modules on purpose: every check the spec puts on a reply lives here, next
to the one parser state that can make it.)
"""

import bisect
import enum
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final

from engine.core.units import KiB, MiB
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import NbdProtocolError

# Spec: servers SHOULD NOT send more than 2^20 extents in one BLOCK_STATUS chunk.
MAX_STATUS_PAYLOAD: Final = 4 + p.DESCRIPTOR.size * 2**20
# Error chunks carry a string of at most 4096 bytes plus a few fixed fields; other non-data
# chunks are smaller still. Bigger means a broken server: refuse before buffering it.
MAX_SMALL_PAYLOAD: Final = 16 * KiB
# Where payloads of abandoned reads go: large enough to swallow an abandoned 32 MiB read in a
# few receive calls, small enough to keep one per connection.
DISCARD_SIZE: Final = 256 * KiB
# Hole chunks are filled from this many zero bytes at a time.
_ZEROS: Final = memoryview(bytes(1 * MiB))


@dataclass(eq=False, slots=True)
class Failure:
    """An error reply: NBD errno, the server's message, and ERROR_OFFSET's offset if any."""

    errno: int
    message: str = ""
    offset: int | None = None


class _Coverage:
    """Byte ranges of a read already answered; refuses overlaps in O(log n)."""

    __slots__ = ("ends", "starts", "total")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] > start:
            return False
        if i < len(self.starts) and self.starts[i] < end:
            return False
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.total += end - start
        return True


@dataclass(eq=False, slots=True)
class Command:
    """One request in flight. ``buf`` is a READ's destination (None once abandoned)."""

    cookie: int
    kind: int
    offset: int
    length: int
    flags: int = 0
    buf: memoryview | None = None
    failure: Failure | None = None
    statuses: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    coverage: _Coverage = field(default_factory=_Coverage)

    @property
    def name(self) -> str:
        return p.COMMAND_NAMES[self.kind]


class _Rx(enum.Enum):
    HEAD = "reply header"  # the first 16 bytes: a whole simple reply or most of a chunk
    CHUNK_HEAD = "structured chunk header"  # the last 4 bytes of a chunk header
    PAYLOAD = "chunk payload"  # a non-data payload, buffered whole
    DATA_OFFSET = "OFFSET_DATA offset"  # the 8-byte offset in front of read data
    DATA = "read data"  # read payload, straight into the command's buffer


class Transmission:
    """Requests in flight on one connection and the parser of their replies."""

    def __init__(self, *, structured: bool, context_ids: Collection[int] = ()) -> None:
        self._structured = structured
        self._context_ids = frozenset(context_ids)
        self._in_flight: dict[int, Command] = {}
        self._cookie = 0
        self._disconnected = False
        self._error: NbdProtocolError | None = None
        self._head = bytearray(p.STRUCTURED_REPLY.size)
        self._payload = bytearray()
        self._discard = bytearray(DISCARD_SIZE)
        self._rx = _Rx.HEAD
        self._want = p.SIMPLE_REPLY.size
        self._got = 0
        # The chunk being parsed: command, flags, type, payload length.
        self._cmd: Command | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_len = 0
        self._simple_data = False
        self._data_pos = 0
        self._data_left = 0

    # --- requests --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def pending(self) -> list[Command]:
        """Commands still waiting for their reply (to fail them when the connection dies)."""
        return list(self._in_flight.values())

    def request(
        self,
        kind: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        buf: memoryview | None = None,
    ) -> tuple[Command, bytes]:
        """Register a command; returns it and the header to send.

        A READ needs ``buf``: a writable byte view of exactly ``length`` bytes that the reply
        fills. Raises ValueError for arguments that cannot be sent, RuntimeError after
        ``disconnect()``.
        """
        if self._disconnected:
            raise RuntimeError("NBD_CMD_DISC was sent; no more requests on this connection")
        if kind == p.CMD_READ:
            if buf is None or buf.readonly or buf.nbytes != length or length == 0:
                raise ValueError(f"READ of {length} bytes needs a writable buffer of that size")
            buf = buf.cast("B") if buf.format != "B" else buf
        elif buf is not None:
            raise ValueError("only READ takes a buffer")
        if kind == p.CMD_BLOCK_STATUS and not self._context_ids:
            raise ValueError("BLOCK_STATUS needs a negotiated metadata context")
        if kind == p.CMD_DISC:
            raise ValueError("use disconnect() to end the transmission")
        cookie = self._next_cookie()
        header = p.encode_request(kind, cookie, offset, length, flags)
        command = Command(cookie, kind, offset, length, flags, buf)
        self._in_flight[cookie] = command
        return command, header

    def disconnect(self) -> bytes:
        """The NBD_CMD_DISC header; no request may follow it. The server does not answer."""
        self._disconnected = True
        return p.encode_request(p.CMD_DISC, self._next_cookie(), 0, 0)

    def abandon(self, command: Command) -> None:
        """The caller gave up on ``command``: its reply is still parsed, its data discarded."""
        command.buf = None

    def _next_cookie(self) -> int:
        while True:
            self._cookie = self._cookie + 1 if self._cookie < p.MAX_U64 else 1
            if self._cookie not in self._in_flight:
                return self._cookie

    # --- receiving -------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Writable memory for the next bytes from the server (at least one byte)."""
        if self._error is not None:
            raise self._error
        if self._rx is _Rx.DATA:
            assert self._cmd is not None
            buf = self._cmd.buf
            if buf is None:
                return memoryview(self._discard)[: min(self._data_left, DISCARD_SIZE)]
            return buf[self._data_pos : self._data_pos + self._data_left]
        if self._rx is _Rx.HEAD or self._rx is _Rx.CHUNK_HEAD:
            return memoryview(self._head)[self._got : self._want]
        return memoryview(self._payload)[self._got : self._want]

    def buffer_updated(self, nbytes: int) -> list[Command]:
        """``nbytes`` were written at the start of the last ``get_buffer()`` view."""
        if self._error is not None:
            raise self._error
        finished: list[Command] = []
        try:
            if self._rx is _Rx.DATA:
                if not 0 < nbytes <= self._data_left:
                    raise ValueError(f"{nbytes} bytes reported for a buffer of {self._data_left}")
                self._data_pos += nbytes
                self._data_left -= nbytes
                if self._data_left == 0:
                    self._data_done(finished)
            else:
                if not 0 < nbytes <= self._want - self._got:
                    raise ValueError(f"{nbytes} bytes reported for {self._want - self._got}")
                self._got += nbytes
                if self._got == self._want:
                    self._unit_done(finished)
        except NbdProtocolError as e:
            self._error = e
            raise
        return finished

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Command]:
        """Feed bytes from the server in pieces of any size; returns finished commands."""
        view = memoryview(data).cast("B")
        finished: list[Command] = []
        while view:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            finished += self.buffer_updated(n)
            view = view[n:]
        return finished

    # --- parsing ---------------------------------------------------------------------------

    def _expect(self, rx: _Rx, want: int) -> None:
        self._rx = rx
        self._want = want
        self._got = 0 if rx is not _Rx.CHUNK_HEAD else self._got

    def _unit_done(self, finished: list[Command]) -> None:
        if self._rx is _Rx.HEAD:
            (magic,) = p.U32.unpack_from(self._head)
            if magic == p.SIMPLE_REPLY_MAGIC:
                self._simple_reply(finished)
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                if not self._structured:
                    raise NbdProtocolError(
                        reason="structured reply chunk, but structured replies were not negotiated"
                    )
                self._expect(_Rx.CHUNK_HEAD, p.STRUCTURED_REPLY.size)
            else:
                raise NbdProtocolError(reason=f"bad reply magic {magic:#010x}")
        elif self._rx is _Rx.CHUNK_HEAD:
            self._chunk_header(finished)
        elif self._rx is _Rx.DATA_OFFSET:
            self._data_offset()
        else:
            self._chunk_payload(bytes(self._payload), finished)

    def _lookup(self, cookie: int, what: str) -> Command:
        command = self._in_flight.get(cookie)
        if command is None:
            raise NbdProtocolError(reason=f"{what} for unknown cookie {cookie}")
        return command

    def _simple_reply(self, finished: list[Command]) -> None:
        _, error, cookie = p.SIMPLE_REPLY.unpack_from(self._head)
        command = self._lookup(cookie, "simple reply")
        if command.kind == p.CMD_READ and self._structured:
            raise NbdProtocolError(
                reason=f"simple reply to READ cookie {cookie}, but structured replies were "
                "negotiated"
            )
        if error:
            command.failure = Failure(error)
        elif command.kind == p.CMD_READ:
            self._cmd = command
            self._simple_data = True
            self._start_data(0, command.length)
            return
        self._expect(_Rx.HEAD, p.SIMPLE_REPLY.size)
        self._finish(command, finished)

    def _chunk_header(self, finished: list[Command]) -> None:
        _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack_from(self._head)
        command = self._lookup(cookie, f"structured reply chunk type {kind}")
        self._cmd = command
        self._chunk_flags = flags
        self._chunk_type = kind
        self._chunk_len = length
        if kind == p.REPLY_TYPE_NONE:
            if length:
                raise self._bad_chunk(f"NONE chunk with {length} payload bytes")
            if not flags & p.REPLY_FLAG_DONE:
                raise self._bad_chunk("NONE chunk without the DONE flag")
            self._chunk_done(finished)
        elif kind == p.REPLY_TYPE_OFFSET_DATA:
            self._require_kind(p.CMD_READ)
            if length <= p.U64.size:
                raise self._bad_chunk(f"OFFSET_DATA chunk of {length} bytes")
            self._payload = bytearray(p.U64.size)
            self._expect(_Rx.DATA_OFFSET, p.U64.size)
        else:
            limit = MAX_STATUS_PAYLOAD if kind == p.REPLY_TYPE_BLOCK_STATUS else MAX_SMALL_PAYLOAD
            if length > limit:
                raise self._bad_chunk(f"chunk type {kind} of {length} bytes (limit {limit})")
            if length == 0:
                self._chunk_payload(b"", finished)
            else:
                self._payload = bytearray(length)
                self._expect(_Rx.PAYLOAD, length)

    def _data_offset(self) -> None:
        command = self._current()
        (offset,) = p.U64.unpack_from(self._payload)
        size = self._chunk_len - p.U64.size
        self._cover(command, offset, size, "OFFSET_DATA")
        self._simple_data = False
        self._start_data(offset - command.offset, size)

    def _start_data(self, pos: int, size: int) -> None:
        self._rx = _Rx.DATA
        self._data_pos = pos
        self._data_left = size

    def _data_done(self, finished: list[Command]) -> None:
        command = self._current()
        if self._simple_data:
            self._simple_data = False
            self._expect(_Rx.HEAD, p.SIMPLE_REPLY.size)
            self._finish(command, finished)
        else:
            self._chunk_done(finished)

    def _chunk_payload(self, payload: bytes, finished: list[Command]) -> None:
        kind = self._chunk_type
        if kind == p.REPLY_TYPE_OFFSET_HOLE:
            self._hole(payload)
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            self._block_status(payload)
        elif kind & p.REPLY_TYPE_FLAG_ERROR:
            self._error_chunk(payload)
        else:
            raise self._bad_chunk(f"unknown structured reply type {kind}")
        self._chunk_done(finished)

    def _hole(self, payload: bytes) -> None:
        command = self._require_kind(p.CMD_READ)
        if len(payload) != p.OFFSET_HOLE.size:
            raise self._bad_chunk(f"OFFSET_HOLE chunk of {len(payload)} bytes, not 12")
        offset, size = p.OFFSET_HOLE.unpack(payload)
        if size == 0:
            raise self._bad_chunk(f"OFFSET_HOLE of size 0 at {offset}")
        self._cover(command, offset, size, "OFFSET_HOLE")
        if command.buf is not None:
            start = offset - command.offset
            view = command.buf[start : start + size]
            for i in range(0, size, len(_ZEROS)):
                n = min(len(_ZEROS), size - i)
                view[i : i + n] = _ZEROS[:n]

    def _block_status(self, payload: bytes) -> None:
        command = self._require_kind(p.CMD_BLOCK_STATUS)
        count, rest = divmod(len(payload) - p.U32.size, p.DESCRIPTOR.size)
        if len(payload) < p.U32.size + p.DESCRIPTOR.size or rest:
            raise self._bad_chunk(f"BLOCK_STATUS chunk of {len(payload)} bytes")
        (context_id,) = p.U32.unpack_from(payload)
        if context_id not in self._context_ids:
            raise self._bad_chunk(f"BLOCK_STATUS for unnegotiated context id {context_id}")
        if context_id in command.statuses:
            raise self._bad_chunk(f"second BLOCK_STATUS chunk for context id {context_id}")
        descriptors = [
            p.DESCRIPTOR.unpack_from(payload, p.U32.size + i * p.DESCRIPTOR.size)
            for i in range(count)
        ]
        if command.flags & p.CMD_FLAG_REQ_ONE and count != 1:
            raise self._bad_chunk(f"{count} descriptors, but REQ_ONE asked for one")
        covered = 0
        for i, (size, _) in enumerate(descriptors):
            if size == 0:
                raise self._bad_chunk(f"block status descriptor {i} has length 0")
            if i == count - 1:
                break
            covered += size
            if covered >= command.length:
                raise self._bad_chunk(
                    f"block status descriptors past the requested {command.length} bytes "
                    "before the last one"
                )
        command.statuses[context_id] = descriptors

    def _error_chunk(self, payload: bytes) -> None:
        command = self._current()
        kind = self._chunk_type
        if len(payload) < p.ERROR_HEAD.size:
            raise self._bad_chunk(f"error chunk of {len(payload)} bytes")
        errno, message_len = p.ERROR_HEAD.unpack_from(payload)
        tail = p.U64.size if kind == p.REPLY_TYPE_ERROR_OFFSET else 0
        if message_len > len(payload) - p.ERROR_HEAD.size - tail:
            raise self._bad_chunk(f"error message of {message_len} bytes overruns its chunk")
        if errno == 0:
            raise self._bad_chunk("error chunk with error value 0")
        start = p.ERROR_HEAD.size
        message = payload[start : start + message_len].decode("utf-8", errors="replace")
        offset = None
        if kind == p.REPLY_TYPE_ERROR_OFFSET:
            (offset,) = p.U64.unpack_from(payload, start + message_len)
            if not command.offset <= offset < command.offset + max(command.length, 1):
                raise self._bad_chunk(f"ERROR_OFFSET {offset} outside the request")
        if command.failure is None:
            command.failure = Failure(errno, message, offset)

    def _chunk_done(self, finished: list[Command]) -> None:
        command = self._current()
        self._expect(_Rx.HEAD, p.SIMPLE_REPLY.size)
        if self._chunk_flags & p.REPLY_FLAG_DONE:
            self._finish(command, finished)

    def _finish(self, command: Command, finished: list[Command]) -> None:
        # Checked while the command is still in flight, so a failure here leaves it in
        # pending() for the driver to fail.
        if command.failure is None:
            if command.kind == p.CMD_READ and self._structured:
                if command.coverage.total != command.length:
                    raise NbdProtocolError(
                        reason=f"READ cookie {command.cookie} offset={command.offset} "
                        f"length={command.length} finished with only "
                        f"{command.coverage.total} bytes answered"
                    )
            elif command.kind == p.CMD_BLOCK_STATUS:
                missing = self._context_ids - command.statuses.keys()
                if missing:
                    raise NbdProtocolError(
                        reason=f"BLOCK_STATUS cookie {command.cookie} finished without "
                        f"context ids {sorted(missing)}"
                    )
        del self._in_flight[command.cookie]
        self._cmd = None
        finished.append(command)

    # --- checks ----------------------------------------------------------------------------

    def _current(self) -> Command:
        assert self._cmd is not None
        return self._cmd

    def _require_kind(self, kind: int) -> Command:
        command = self._current()
        if command.kind != kind:
            raise self._bad_chunk(f"chunk type {self._chunk_type} is not valid for this command")
        return command

    def _cover(self, command: Command, offset: int, size: int, what: str) -> None:
        end = offset + size
        if offset < command.offset or end > command.offset + command.length:
            raise self._bad_chunk(f"{what} [{offset}, {end}) outside the request")
        if not command.coverage.add(offset, end):
            raise self._bad_chunk(f"{what} [{offset}, {end}) overlaps an earlier chunk")

    def _bad_chunk(self, reason: str) -> NbdProtocolError:
        command = self._current()
        return NbdProtocolError(
            reason=f"{reason} (reply to {command.name} cookie {command.cookie} "
            f"offset={command.offset} length={command.length})"
        )
