"""The server side of NBD as one sans-IO state machine: handshake, then transmission.

Drive it with bytes, like ``handshake.Handshake`` on the client side: feed what the client
sends to ``receive_data()``, which returns *events*; send ``data_to_send()`` after every
call. The machine answers every option of the handshake itself (it only needs the exports'
``ExportSpec``), and checks every request (bounds, flags, read-only, sizes); a request that
fails a check is answered with its error here and never reaches the caller. What reaches
the caller is ``Ready`` (transmission begins), ``Request`` (a valid command: the caller
answers it with ``reply_*`` in any order, as NBD allows), ``Disconnect`` (NBD_CMD_DISC or
NBD_OPT_ABORT: close once the data to send is sent), and with TLS ``StartTls`` (send the
data to send, then upgrade the connection to TLS and call ``tls_started()``).

Handshake (fixed newstyle; what this server answers)
===================================================

::

    S: "NBDMAGIC" IHAVEOPT  FIXED_NEWSTYLE|NO_ZEROES
    C: client flags (FIXED_NEWSTYLE required; NO_ZEROES optional)
    C: OPT_LIST                    S: REP_SERVER [name] per export, REP_ACK
    C: OPT_STRUCTURED_REPLY        S: REP_ACK
    C: OPT_LIST_META_CONTEXT /     S: REP_META_CONTEXT [id, "base:allocation"] if asked
       OPT_SET_META_CONTEXT           (or, for LIST, no query at all / "base:"), REP_ACK
    C: OPT_INFO / OPT_GO [name]    S: REP_INFO EXPORT [size, flags], REP_INFO BLOCK_SIZE
                                      [1, preferred, maximum], NAME / DESCRIPTION if
                                      asked, REP_ACK  (GO: transmission begins)
    C: OPT_EXPORT_NAME [name]      S: size, flags [, 124 zero bytes]: transmission begins
    C: OPT_ABORT                   S: REP_ACK, then close
    C: anything else               S: REP_ERR_UNSUP (STARTTLS too unless TLS is required)

TLS (``tls=True``: the spec's FORCEDTLS mode; every option but two needs TLS first)
==================================================================================

::

    C: OPT_LIST / GO / ... (plain) S: REP_ERR_TLS_REQD      (EXPORT_NAME: close, no reply exists)
    C: OPT_STARTTLS (no data)      S: REP_ACK           ─►  event StartTls: the transport sends
                                                            the ACK, then runs the TLS handshake
                                                            (server side) and calls
                                                            tls_started(); nothing is read in
                                                            between
    ══ TLS ════════════════════════════════════════════════════════════════════════════════
    C: options as above            S: answers as above (structured replies and contexts
                                      negotiated before TLS are forgotten, as the spec asks)
    C: OPT_STARTTLS again          S: REP_ERR_INVALID

STARTTLS with data is answered REP_ERR_INVALID. Bytes from the client after STARTTLS and
before the TLS handshake break the protocol (the client must wait for the ACK):
``NbdProtocolError``. Without ``tls`` STARTTLS is answered REP_ERR_UNSUP and nothing else
changes. TLS works the same on TCP and on unix sockets (``nbds+unix://``).

An unknown export name gets REP_ERR_UNKNOWN; malformed option data REP_ERR_INVALID; option
data over ``MAX_OPTION_DATA`` is skipped and answered REP_ERR_TOO_BIG.

Transmission
============

::

    C: READ cookie=1 [0, 3M)
    S: chunk cookie=1 OFFSET_DATA  offset=0  data[1M]        reply_read(): pieces of data
    S: chunk cookie=1 OFFSET_HOLE  offset=1M size=2M DONE    and holes, in the order given
    C: BLOCK_STATUS cookie=2 [0, 4G)
    S: chunk cookie=2 BLOCK_STATUS ctx=1 [(1M, 0), (2M, HOLE|ZERO)] DONE

Without structured replies a read is one simple reply followed by every byte (holes as
zeroes). Errors the machine answers itself: EINVAL for an unknown command, a flag the export
does not offer, a read or status past the end, a request over the maximum block size,
BLOCK_STATUS with no context negotiated; EPERM for a write, zero or trim on a read-only
export; ENOSPC for a write past the end. A WRITE's payload is always consumed (also when it
is refused), so the stream stays in step. Protocol errors (bad magic, bad client flags,
options or requests that cannot be parsed) raise ``NbdProtocolError``: close the connection.
"""

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from engine.core.units import KiB
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import EINVAL, ENOSPC, EPERM, NbdProtocolError

# Option data larger than this is skipped and refused (REP_ERR_TOO_BIG): the largest
# legitimate one is a SET_META_CONTEXT naming a few contexts of at most 4096 bytes each.
MAX_OPTION_DATA: Final = 64 * KiB
# Options before transmission begins: a client looping on LIST must not keep a connection
# (and its task) forever.
MAX_OPTIONS: Final = 1024
# The id of base:allocation on every connection (the only context served).
BASE_ALLOCATION_ID: Final = 1
# Bytes NBD_OPT_EXPORT_NAME's reply is padded with unless the client asked NO_ZEROES.
EXPORT_NAME_PADDING: Final = 124

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """What the server tells clients of one export (all of it fixed while it is served)."""

    name: str
    size: int
    read_only: bool = True
    description: str = ""
    preferred_block: int = 4096  # a power of two >= 512: the store's chunk size
    max_block: int = p.MAX_REQUEST  # largest READ / WRITE payload accepted
    multi_conn: bool = False  # several connections see one consistent disk
    allocation: bool = True  # base:allocation can be negotiated

    @property
    def flags(self) -> int:
        flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH
        if self.read_only:
            flags |= p.FLAG_READ_ONLY
        else:
            flags |= p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES
        if self.multi_conn:
            flags |= p.FLAG_CAN_MULTI_CONN
        return flags


@dataclass(frozen=True, slots=True)
class Ready:
    """Transmission begins on ``export``."""

    export: ExportSpec
    structured: bool
    allocation: bool  # base:allocation was negotiated (id BASE_ALLOCATION_ID)


@dataclass(frozen=True, slots=True)
class Request:
    """A checked command for the caller to carry out and answer (``reply_*``).

    ``data`` is a WRITE's payload (None for every other command). ``fua``: the write must
    be durable before its reply. ``req_one``: BLOCK_STATUS wants a single descriptor.
    """

    kind: int
    cookie: int
    offset: int
    length: int
    flags: int = 0
    data: bytes | None = None

    @property
    def name(self) -> str:
        return p.COMMAND_NAMES.get(self.kind, f"command {self.kind}")

    @property
    def fua(self) -> bool:
        return bool(self.flags & p.CMD_FLAG_FUA)

    @property
    def req_one(self) -> bool:
        return bool(self.flags & p.CMD_FLAG_REQ_ONE)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session (NBD_CMD_DISC, NBD_OPT_ABORT): close after sending."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """The client's NBD_OPT_STARTTLS was acknowledged: send ``data_to_send()`` (the ACK) in
    clear, then run the TLS handshake as the server and call ``tls_started()``. The machine
    accepts no bytes until then; everything after goes through TLS."""


Event = Ready | Request | Disconnect | StartTls


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a READ's answer: ``data`` at disk offset ``offset``."""

    offset: int
    data: Buffer


@dataclass(frozen=True, slots=True)
class Hole:
    """A piece of a READ's answer that reads as zeroes."""

    offset: int
    length: int


Piece = Data | Hole

# Flags a client may set on each command, given the export (FUA only on a writable one).
_COMMAND_FLAGS: Final = {
    p.CMD_READ: 0,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: 0,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_REQ_ONE,
    p.CMD_DISC: 0,
}
_WRITES: Final = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})


class _State(enum.Enum):
    CLIENT_FLAGS = "waiting for the client flags"
    OPTIONS = "negotiating options"
    SKIP_OPTION = "skipping option data"
    STARTING_TLS = "waiting for the TLS handshake"
    TRANSMISSION = "in transmission"
    WRITE_DATA = "receiving a write payload"
    CLOSED = "closed"


class ServerConnection:
    """One client connection of an NBD server. See the module docstring for its use.

    ``exports`` maps every name a client may ask for to its export; ``""`` (the default
    export) may map to the same one. ``listed`` are the names NBD_OPT_LIST shows. ``tls``:
    the client must upgrade to TLS with NBD_OPT_STARTTLS before any other option (the
    transport must be able to do so when it sees ``StartTls``).
    """

    def __init__(
        self, exports: Mapping[str, ExportSpec], listed: Sequence[str] = (), *, tls: bool = False
    ) -> None:
        self._tls_required = tls
        self._tls = False  # the TLS handshake is done
        self._exports = dict(exports)
        self._listed = tuple(listed) or tuple(n for n in self._exports if n)
        self._in = bytearray()
        self._out = bytearray(p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, _HANDSHAKE_FLAGS))
        self._state = _State.CLIENT_FLAGS
        self._no_zeroes = False
        self._options = 0
        self._skip = 0
        self._skip_option = 0
        self._structured = False
        self._allocation = False  # base:allocation selected by SET_META_CONTEXT
        self._export: ExportSpec | None = None
        self._write: Request | None = None  # a WRITE whose payload is being received
        self._write_error = 0  # its error (0: valid)
        self._skip_write = 0  # payload bytes of a refused write still to discard

    @property
    def export(self) -> ExportSpec:
        if self._export is None:
            raise RuntimeError(f"no export yet ({self._state.value})")
        return self._export

    @property
    def structured(self) -> bool:
        return self._structured

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def tls(self) -> bool:
        """The connection runs over TLS (``tls_started()`` was called)."""
        return self._tls

    def tls_started(self) -> None:
        """The transport finished the TLS handshake that ``StartTls`` asked for: option
        haggling goes on, over TLS. RuntimeError when no ``StartTls`` is pending."""
        if self._state is not _State.STARTING_TLS:
            raise RuntimeError(f"no TLS handshake pending ({self._state.value})")
        self._tls = True
        self._state = _State.OPTIONS

    @property
    def expecting(self) -> int:
        """Bytes the machine needs before it can make progress (a hint for receive sizes)."""
        if self._state is _State.WRITE_DATA and self._write is not None:
            return max(1, self._write.length - len(self._in))
        return 1

    def data_to_send(self) -> bytes:
        """Bytes for the client (possibly empty); each call drains them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: Buffer) -> list[Event]:
        """Consume bytes from the client, in pieces of any size; returns the events."""
        events: list[Event] = []
        if self.closed:
            return events  # after DISC or ABORT nothing more is read
        if self._state is _State.STARTING_TLS and data:
            raise NbdProtocolError(reason="client sent data before the TLS handshake began")
        self._in += data
        while not self.closed and self._step(events):
            pass
        return events

    # --- replies (transmission) --------------------------------------------------------------

    def reply_ok(self, request: Request) -> list[Buffer]:
        """Success of a command without data (WRITE, FLUSH, TRIM, WRITE_ZEROES)."""
        if self._structured and request.kind == p.CMD_READ:
            return [_chunk(request.cookie, p.REPLY_TYPE_NONE, 0, p.REPLY_FLAG_DONE)]
        return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, request.cookie)]

    def reply_error(self, request: Request, errno: int, message: str = "") -> list[Buffer]:
        """The command failed with ``errno`` (an NBD error value, e.g. EIO)."""
        if not errno:
            raise ValueError("an error reply needs a non-zero error value")
        if self._structured and request.kind in (p.CMD_READ, p.CMD_BLOCK_STATUS):
            raw = message.encode("utf-8")[: p.MAX_STRING]
            payload = p.ERROR_HEAD.pack(errno, len(raw)) + raw
            return [
                _chunk(request.cookie, p.REPLY_TYPE_ERROR, len(payload), p.REPLY_FLAG_DONE),
                payload,
            ]
        return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, errno, request.cookie)]

    def reply_read(self, request: Request, pieces: Iterable[Piece]) -> list[Buffer]:
        """A READ's answer; ``pieces`` cover ``[offset, offset + length)`` exactly, in order
        (ValueError otherwise). Structured: one chunk per piece, the last one DONE; simple:
        one header then every byte. The buffers returned reference the pieces' data."""
        pieces = list(pieces)
        pos = request.offset
        for piece in pieces:
            size = len(piece.data) if isinstance(piece, Data) else piece.length
            if piece.offset != pos or size <= 0:
                raise ValueError(f"read piece at {piece.offset}+{size} does not follow {pos}")
            pos += size
        if pos != request.offset + request.length:
            raise ValueError(f"read pieces end at {pos}, not {request.offset + request.length}")
        if not self._structured:
            out: list[Buffer] = [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, request.cookie)]
            for piece in pieces:
                out.append(piece.data if isinstance(piece, Data) else _zeroes(piece.length))
            return out
        if not pieces:
            return self.reply_ok(request)
        out = []
        for i, piece in enumerate(pieces):
            flags = p.REPLY_FLAG_DONE if i == len(pieces) - 1 else 0
            if isinstance(piece, Data):
                size = p.U64.size + len(piece.data)
                out += [
                    _chunk(request.cookie, p.REPLY_TYPE_OFFSET_DATA, size, flags),
                    p.U64.pack(piece.offset),
                    piece.data,
                ]
            else:
                hole = p.OFFSET_HOLE.pack(piece.offset, piece.length)
                out += [_chunk(request.cookie, p.REPLY_TYPE_OFFSET_HOLE, len(hole), flags), hole]
        return out

    def reply_block_status(
        self, request: Request, descriptors: Sequence[tuple[int, int]]
    ) -> list[Buffer]:
        """BLOCK_STATUS's answer for base:allocation: (length, flags) from the request's
        offset, at least one. With REQ_ONE only the first is sent."""
        if not descriptors:
            raise ValueError("a block status reply needs at least one descriptor")
        if request.req_one:
            descriptors = descriptors[:1]
        payload = p.U32.pack(BASE_ALLOCATION_ID) + b"".join(
            p.DESCRIPTOR.pack(length, flags) for length, flags in descriptors
        )
        return [
            _chunk(request.cookie, p.REPLY_TYPE_BLOCK_STATUS, len(payload), p.REPLY_FLAG_DONE),
            payload,
        ]

    # --- steps: each consumes one message or returns False to wait for more ------------------

    def _step(self, events: list[Event]) -> bool:
        state = self._state
        if state is _State.CLIENT_FLAGS:
            return self._client_flags()
        if state is _State.OPTIONS:
            return self._option(events)
        if state is _State.SKIP_OPTION:
            return self._skip_data()
        if state is _State.STARTING_TLS:
            return False
        if state is _State.TRANSMISSION:
            return self._request(events)
        return self._write_data(events)

    def _client_flags(self) -> bool:
        if len(self._in) < p.CLIENT_FLAGS.size:
            return False
        (flags,) = p.CLIENT_FLAGS.unpack_from(self._in)
        del self._in[: p.CLIENT_FLAGS.size]
        if not flags & p.FLAG_C_FIXED_NEWSTYLE:
            raise NbdProtocolError(reason="client does not speak fixed newstyle negotiation")
        if flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise NbdProtocolError(reason=f"unknown client flags {flags:#x}")
        self._no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        self._state = _State.OPTIONS
        return True

    def _option(self, events: list[Event]) -> bool:
        head = p.OPTION_HEADER.size
        if len(self._in) < head:
            return False
        magic, option, length = p.OPTION_HEADER.unpack_from(self._in)
        if magic != p.IHAVEOPT:
            raise NbdProtocolError(reason=f"bad option magic {magic:#x}")
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise NbdProtocolError(reason=f"more than {MAX_OPTIONS} options")
        if length > MAX_OPTION_DATA:
            del self._in[:head]
            self._skip, self._skip_option = length, option
            self._state = _State.SKIP_OPTION
            return True
        if len(self._in) < head + length:
            return False
        data = bytes(self._in[head : head + length])
        del self._in[: head + length]
        self._answer_option(option, data, events)
        return True

    def _skip_data(self) -> bool:
        n = min(self._skip, len(self._in))
        del self._in[:n]
        self._skip -= n
        if self._skip:
            return False
        self._state = _State.OPTIONS
        self._option_reply(self._skip_option, p.REP_ERR_TOO_BIG, b"option data too large")
        return True

    def _answer_option(self, option: int, data: bytes, events: list[Event]) -> None:
        if option == p.OPT_ABORT:
            self._option_reply(option, p.REP_ACK)
            self._state = _State.CLOSED
            events.append(Disconnect("the client sent NBD_OPT_ABORT"))
        elif option == p.OPT_STARTTLS and self._tls_required:
            self._starttls(data, events)
        elif self._tls_required and not self._tls:
            if option == p.OPT_EXPORT_NAME:  # it has no error reply: the spec says close
                raise NbdProtocolError(reason="NBD_OPT_EXPORT_NAME before TLS (TLS required)")
            name = p.OPTION_NAMES.get(option, f"option {option}")
            self._option_reply(
                option,
                p.REP_ERR_TLS_REQD,
                f"TLS required: send NBD_OPT_STARTTLS before {name}".encode(),
            )
        elif option == p.OPT_LIST:
            self._list(data)
        elif option == p.OPT_STRUCTURED_REPLY:
            if data:
                self._option_reply(option, p.REP_ERR_INVALID, b"no data expected")
            else:
                self._structured = True
                self._option_reply(option, p.REP_ACK)
        elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
        elif option in (p.OPT_INFO, p.OPT_GO):
            self._info(option, data, events)
        elif option == p.OPT_EXPORT_NAME:
            self._export_name(data, events)
        else:
            name = p.OPTION_NAMES.get(option, f"option {option}")
            self._option_reply(option, p.REP_ERR_UNSUP, f"{name} is not supported".encode())

    def _starttls(self, data: bytes, events: list[Event]) -> None:
        if self._tls:
            self._option_reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, b"TLS is already running")
        elif data:
            self._option_reply(p.OPT_STARTTLS, p.REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        elif self._in:
            # The client must wait for the ACK before its TLS handshake: what came is neither
            # an option nor TLS this side could read.
            raise NbdProtocolError(
                reason="client sent data after NBD_OPT_STARTTLS before its reply"
            )
        else:
            self._option_reply(p.OPT_STARTTLS, p.REP_ACK)
            # Nothing negotiated in clear survives (spec): in FORCEDTLS mode nothing was.
            self._structured = self._allocation = False
            self._state = _State.STARTING_TLS
            events.append(StartTls())

    def _option_reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(payload))
        self._out += payload

    def _list(self, data: bytes) -> None:
        if data:
            self._option_reply(p.OPT_LIST, p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name in self._listed:
            raw = name.encode("utf-8")
            self._option_reply(p.OPT_LIST, p.REP_SERVER, p.U32.pack(len(raw)) + raw)
        self._option_reply(p.OPT_LIST, p.REP_ACK)

    def _meta_context(self, option: int, data: bytes) -> None:
        parsed = _parse_meta_context(data)
        if parsed is None:
            self._option_reply(option, p.REP_ERR_INVALID, b"malformed metadata context query")
            return
        name, queries = parsed
        export = self._exports.get(name)
        if export is None:
            self._option_reply(option, p.REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        if not self._structured:
            self._option_reply(
                option, p.REP_ERR_INVALID, b"metadata contexts need structured replies first"
            )
            return
        listing = option == p.OPT_LIST_META_CONTEXT
        wanted = any(q == p.BASE_ALLOCATION or (listing and q == "base:") for q in queries) or (
            listing and not queries
        )
        selected = wanted and export.allocation
        if selected:
            raw = p.BASE_ALLOCATION.encode()
            self._option_reply(option, p.REP_META_CONTEXT, p.U32.pack(BASE_ALLOCATION_ID) + raw)
        if not listing:
            self._allocation = selected
        self._option_reply(option, p.REP_ACK)

    def _info(self, option: int, data: bytes, events: list[Event]) -> None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._option_reply(option, p.REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")
            return
        name, requests = parsed
        export = self._exports.get(name)
        if export is None:
            self._option_reply(option, p.REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        self._option_reply(
            option, p.REP_INFO, p.INFO_EXPORT_LAYOUT.pack(p.INFO_EXPORT, export.size, export.flags)
        )
        # Sent whether asked or not (allowed: the minimum of 1 asks nothing of the client).
        self._option_reply(
            option,
            p.REP_INFO,
            p.INFO_BLOCK_SIZE_LAYOUT.pack(
                p.INFO_BLOCK_SIZE, 1, export.preferred_block, export.max_block
            ),
        )
        if p.INFO_NAME in requests:
            self._option_reply(option, p.REP_INFO, p.U16.pack(p.INFO_NAME) + export.name.encode())
        if p.INFO_DESCRIPTION in requests and export.description:
            raw = export.description.encode("utf-8")[: p.MAX_STRING]
            self._option_reply(option, p.REP_INFO, p.U16.pack(p.INFO_DESCRIPTION) + raw)
        self._option_reply(option, p.REP_ACK)
        if option == p.OPT_GO:
            self._begin(export, events)

    def _export_name(self, data: bytes, events: list[Event]) -> None:
        # No error reply exists for this option: an unknown name can only close.
        export = self._exports.get(data.decode("utf-8", errors="replace"))
        if export is None:
            raise NbdProtocolError(reason=f"NBD_OPT_EXPORT_NAME of unknown export {data!r}")
        self._out += p.U64.pack(export.size) + p.U16.pack(export.flags)
        if not self._no_zeroes:
            self._out += bytes(EXPORT_NAME_PADDING)
        self._begin(export, events)

    def _begin(self, export: ExportSpec, events: list[Event]) -> None:
        self._export = export
        self._allocation = self._allocation and self._structured
        self._state = _State.TRANSMISSION
        events.append(Ready(export, self._structured, self._allocation))

    # --- transmission ------------------------------------------------------------------------

    def _request(self, events: list[Event]) -> bool:
        if len(self._in) < p.REQUEST.size:
            return False
        req = p.decode_request(bytes(self._in[: p.REQUEST.size]))
        del self._in[: p.REQUEST.size]
        request = Request(req.kind, req.cookie, req.offset, req.length, req.flags)
        error = self._check(request)
        if request.kind == p.CMD_WRITE:
            self._write, self._write_error, self._skip_write = request, error, request.length
            self._state = _State.WRITE_DATA
            return True
        if request.kind == p.CMD_DISC:
            self._state = _State.CLOSED
            events.append(Disconnect("the client sent NBD_CMD_DISC"))
        elif error:
            self._out += b"".join(self.reply_error(request, error, _ERROR_TEXT[error]))
        elif request.kind == p.CMD_READ and request.length == 0:
            self._out += b"".join(self.reply_read(request, ()))
        else:
            events.append(request)
        return True

    def _write_data(self, events: list[Event]) -> bool:
        request = self._write
        assert request is not None
        if self._write_error:  # refused: discard the payload as it comes, never buffer it
            n = min(self._skip_write, len(self._in))
            del self._in[:n]
            self._skip_write -= n
            if self._skip_write:
                return False
            self._out += b"".join(
                self.reply_error(request, self._write_error, _ERROR_TEXT[self._write_error])
            )
        else:
            if len(self._in) < request.length:
                return False
            data = bytes(self._in[: request.length])
            del self._in[: request.length]
            events.append(
                Request(
                    request.kind,
                    request.cookie,
                    request.offset,
                    request.length,
                    request.flags,
                    data,
                )
            )
        self._write = None
        self._state = _State.TRANSMISSION
        return True

    def _check(self, request: Request) -> int:
        """The error value a request gets without reaching the caller, or 0."""
        export = self.export
        kind = request.kind
        allowed = _COMMAND_FLAGS.get(kind)
        ranged = kind in (p.CMD_READ, p.CMD_BLOCK_STATUS) or kind in _WRITES
        checks = (
            (allowed is None, EINVAL),  # unknown command, or CACHE (not offered)
            (kind in _WRITES and export.read_only, EPERM),
            (allowed is not None and request.flags & ~allowed, EINVAL),
            (kind == p.CMD_BLOCK_STATUS and (not self._allocation or not request.length), EINVAL),
            (kind in (p.CMD_READ, p.CMD_WRITE) and request.length > export.max_block, EINVAL),
            (
                ranged and request.offset + request.length > export.size,
                ENOSPC if kind in _WRITES else EINVAL,
            ),
        )
        return next((errno for failed, errno in checks if failed), 0)


_HANDSHAKE_FLAGS: Final = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
_ERROR_TEXT: Final = {
    EINVAL: "invalid request (command, flags, range or size)",
    EPERM: "the export is read-only",
    ENOSPC: "beyond the end of the export",
}
_ZERO_BLOCK: Final = bytes(1024 * KiB)


def _zeroes(n: int) -> Buffer:
    return _ZERO_BLOCK[:n] if n <= len(_ZERO_BLOCK) else bytes(n)


def _chunk(cookie: int, kind: int, length: int, flags: int = 0) -> bytes:
    return p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def _parse_name(data: bytes) -> tuple[str, int] | None:
    """(export name, bytes consumed) from a u32-length-prefixed name, None if malformed."""
    if len(data) < p.U32.size:
        return None
    (n,) = p.U32.unpack_from(data)
    if n > p.MAX_STRING or len(data) < p.U32.size + n:
        return None
    raw = data[p.U32.size : p.U32.size + n]
    try:
        return raw.decode("utf-8"), p.U32.size + n
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    named = _parse_name(data)
    if named is None:
        return None
    name, pos = named
    if len(data) < pos + p.U16.size:
        return None
    (count,) = p.U16.unpack_from(data, pos)
    pos += p.U16.size
    if len(data) != pos + count * p.U16.size:
        return None
    return name, [p.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]


def _parse_meta_context(data: bytes) -> tuple[str, list[str]] | None:
    named = _parse_name(data)
    if named is None or len(data) < named[1] + p.U32.size:
        return None
    name, pos = named
    (count,) = p.U32.unpack_from(data, pos)
    pos += p.U32.size
    queries = []
    for _ in range(count):
        query = _parse_name(data[pos:])
        if query is None:
            return None
        queries.append(query[0])
        pos += query[1]
    if pos != len(data):
        return None
    return name, queries
