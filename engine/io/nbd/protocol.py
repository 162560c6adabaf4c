"""NBD wire format: constants, struct layouts, request encoding, extent flags. Sans-IO.

Nothing here touches a socket or an event loop; ``handshake.py`` and ``transmission.py`` are
the two state machines built on these layouts, and ``client.py`` drives them over asyncio.
The spec is https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md; only the
fixed newstyle handshake and compact (not extended) headers are spoken.

Handshake (fixed newstyle, what this client sends)
==================================================

::

    S: "NBDMAGIC" "IHAVEOPT" handshake flags (FIXED_NEWSTYLE [| NO_ZEROES])     18 bytes
    C: client flags FIXED_NEWSTYLE [| NO_ZEROES]                                  4 bytes
    C: IHAVEOPT NBD_OPT_STRUCTURED_REPLY len=0
    S: REPLY_MAGIC opt type=ACK len=0        (or ERR_UNSUP: simple replies only, no contexts)
    C: IHAVEOPT NBD_OPT_SET_META_CONTEXT [export name, "base:allocation",
                                          "qemu:dirty-bitmap:NAME", ...]
    S: REPLY_MAGIC opt type=META_CONTEXT [id=1 "base:allocation"]     one per context the
    S: REPLY_MAGIC opt type=META_CONTEXT [id=2 "qemu:dirty-bitmap:b"] server selected; an
    S: REPLY_MAGIC opt type=ACK                                         unknown name is skipped
    C: IHAVEOPT NBD_OPT_GO [export name, info requests: BLOCK_SIZE]
    S: REPLY_MAGIC opt type=INFO [NBD_INFO_EXPORT size, transmission flags]   any order,
    S: REPLY_MAGIC opt type=INFO [NBD_INFO_BLOCK_SIZE min, preferred, max]    unknown infos
    S: REPLY_MAGIC opt type=ACK                                                ignored
       ... transmission phase; an error reply (bit 31) to GO ends the handshake with
       NbdOptionError (unknown export, TLS required, ...).

Transmission: requests are pipelined, replies come back in any order
=====================================================================

::

    C: READ cookie=1 [0, 1M)    C: BLOCK_STATUS cookie=2 [0, 4G)    C: WRITE cookie=3 + data
    S: simple reply cookie=3 error=0                  <- write done first; order is free
    S: chunk cookie=1 OFFSET_DATA  offset=0    data[64k]
    S: chunk cookie=2 BLOCK_STATUS ctx=1 [(64k, 0), (960k, HOLE|ZERO), ...]   <- interleaved
    S: chunk cookie=1 OFFSET_HOLE  offset=64k  size=960k     <- client fills zeroes
    S: chunk cookie=2 BLOCK_STATUS ctx=2 [(1M, 0), (3M, DIRTY)] flags=DONE
    S: chunk cookie=1 NONE flags=DONE                        <- read complete

A structured reply is one or more chunks with the same cookie; the last one carries
NBD_REPLY_FLAG_DONE. Content chunks of a read may come in any order but never overlap, and
together (when no error chunk came) they cover the request exactly. Error chunks
(ERROR, ERROR_OFFSET, any type with bit 15) fail the request, not the connection.

BLOCK_STATUS extents: what a server may answer
==============================================

::

    Storage:  [dddddddddddd|000000000000|dddddddddddddd|
    Request:  [------------------------------------]
    Short:    [dddddddddddd]                         ask again from where it stopped
    Long:     [dddddddddddd|000000000000|dddddddddddddd]   the last one may run past the
                                                           request: clip it
    Split:    [dddddd|dddddd|000000|000000|dddddddd]   same flags twice: merge them
    Result:   [dddddddddddd|000000000000|dddddddddd]

``to_extents`` clips and merges one reply; ``client.extents`` asks again until the range is
covered.
"""

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from engine.core.extent import Extent
from engine.core.units import MiB
from engine.io.nbd.errors import NbdProtocolError

# --- Magic numbers ---------------------------------------------------------------------------
NBDMAGIC: Final = b"NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # ASCII "IHAVEOPT"; also the magic of every option
OLDSTYLE_MAGIC: Final = 0x00420281861253  # oldstyle servers send this instead of IHAVEOPT
OPTION_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- Handshake flags (server, 16 bits) and client flags (32 bits) ----------------------------
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# --- Transmission flags (16 bits, in NBD_INFO_EXPORT) ----------------------------------------
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- Options ---------------------------------------------------------------------------------
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

OPTION_NAMES: Final = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_LIST: "NBD_OPT_LIST",
    OPT_STARTTLS: "NBD_OPT_STARTTLS",
    OPT_INFO: "NBD_OPT_INFO",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

# --- Option reply types; errors have bit 31 set ----------------------------------------------
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

REPLY_NAMES: Final = {
    REP_ACK: "NBD_REP_ACK",
    REP_SERVER: "NBD_REP_SERVER",
    REP_INFO: "NBD_REP_INFO",
    REP_META_CONTEXT: "NBD_REP_META_CONTEXT",
    REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP (option not supported)",
    REP_ERR_POLICY: "NBD_REP_ERR_POLICY (forbidden by server policy)",
    REP_ERR_INVALID: "NBD_REP_ERR_INVALID (invalid option)",
    REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM (not supported on this platform)",
    REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD (TLS required)",
    REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN (no such export)",
    REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN (server shutting down)",
    REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
    REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG (request too big)",
}

# --- NBD_OPT_INFO / NBD_OPT_GO information types ---------------------------------------------
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# --- Commands and command flags --------------------------------------------------------------
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

COMMAND_NAMES: Final = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# The flags each command may carry; anything else is a bug in the caller.
ALLOWED_CMD_FLAGS: Final = {
    CMD_READ: 0,
    CMD_WRITE: 0,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_NO_HOLE,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# --- Structured replies ----------------------------------------------------------------------
REPLY_FLAG_DONE: Final = 1 << 0

REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_OFFSET_HOLE: Final = 2
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_FLAG_ERROR: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_FLAG_ERROR | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_FLAG_ERROR | 2

# --- Metadata contexts and their block status flags ------------------------------------------
BASE_ALLOCATION: Final = "base:allocation"
DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"
STATE_HOLE: Final = 1 << 0  # base:allocation: not allocated
STATE_ZERO: Final = 1 << 1  # base:allocation: reads as zeroes
STATE_DIRTY: Final = 1 << 0  # qemu:dirty-bitmap:NAME: changed since the bitmap was started

# --- Layouts (network byte order) ------------------------------------------------------------
GREETING: Final = struct.Struct(">8sQH")  # "NBDMAGIC", IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, data length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length
INFO_EXPORT_LAYOUT: Final = struct.Struct(">HQH")  # type, export size, transmission flags
INFO_BLOCK_SIZE_LAYOUT: Final = struct.Struct(">HIII")  # type, minimum, preferred, maximum
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
U64: Final = struct.Struct(">Q")
OFFSET_HOLE: Final = struct.Struct(">QI")  # offset, hole size
ERROR_HEAD: Final = struct.Struct(">IH")  # error, message length
DESCRIPTOR: Final = struct.Struct(">II")  # extent length, status flags

# --- Bounds ----------------------------------------------------------------------------------
MAX_U32: Final = 2**32 - 1
MAX_U64: Final = 2**64 - 1
MAX_STRING: Final = 4096  # spec: strings (export names, messages) MUST be at most 4096 bytes
# Spec default maximum payload when the server does not advertise NBD_INFO_BLOCK_SIZE, and the
# largest read or write every server must accept: servers reject larger requests.
MAX_REQUEST: Final = 32 * MiB


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request header (what a server reads; used by tests and fake servers)."""

    flags: int
    kind: int
    cookie: int
    offset: int
    length: int


def encode_request(kind: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    """The 28-byte request header; a WRITE's data follows it on the wire.

    Raises ValueError for a field that does not fit or a flag the command may not carry.
    """
    if kind not in ALLOWED_CMD_FLAGS:
        raise ValueError(f"NBD command {kind} is not supported by this client")
    if flags & ~ALLOWED_CMD_FLAGS[kind]:
        raise ValueError(f"flags {flags:#x} are not valid for NBD_CMD_{COMMAND_NAMES[kind]}")
    if not 0 <= cookie <= MAX_U64:
        raise ValueError(f"cookie {cookie} does not fit in 64 bits")
    if not 0 <= offset <= MAX_U64 or not 0 <= length <= MAX_U32 or offset + length > MAX_U64:
        raise ValueError(f"offset={offset} length={length} do not fit an NBD request")
    return REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def decode_request(data: bytes) -> Request:
    """Parse a request header; raises NbdProtocolError for a short header or bad magic."""
    if len(data) != REQUEST.size:
        raise NbdProtocolError(reason=f"request header is {len(data)} bytes, not {REQUEST.size}")
    magic, flags, kind, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(reason=f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def encode_string(text: str, what: str) -> bytes:
    """UTF-8 bytes of a protocol string; ValueError if the spec forbids it."""
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING or b"\0" in raw:
        raise ValueError(f"{what} {text!r} is longer than {MAX_STRING} bytes or contains NUL")
    return raw


def check_context_name(name: str) -> None:
    """ValueError unless ``name`` is a metadata context this client can interpret."""
    if name != BASE_ALLOCATION and not (
        name.startswith(DIRTY_BITMAP_PREFIX) and len(name) > len(DIRTY_BITMAP_PREFIX)
    ):
        raise ValueError(
            f"metadata context {name!r}: only {BASE_ALLOCATION!r} and "
            f"'{DIRTY_BITMAP_PREFIX}NAME' are understood"
        )
    encode_string(name, "metadata context")


def extent_flags(context: str, status: int) -> tuple[bool, bool, bool]:
    """(zero, hole, dirty) for a block status descriptor of ``context``."""
    if context == BASE_ALLOCATION:
        return bool(status & STATE_ZERO), bool(status & STATE_HOLE), False
    return False, False, bool(status & STATE_DIRTY)


def to_extents(
    context: str, offset: int, length: int, descriptors: Iterable[tuple[int, int]]
) -> list[Extent]:
    """Extents of one BLOCK_STATUS reply for ``[offset, offset + length)``.

    ``descriptors`` are (length, status flags) pairs as the server sent them, starting at
    ``offset``. The result is clipped to the requested range and consecutive descriptors with
    the same flags are merged; it may cover less than ``length`` (a short answer) but never
    more. Zero-length descriptors are refused (NbdProtocolError).
    """
    end = offset + length
    out: list[Extent] = []
    pos = offset
    for size, status in descriptors:
        if size == 0:
            raise NbdProtocolError(reason=f"block status descriptor of length 0 at {pos}")
        if pos >= end:
            break
        step = min(size, end - pos)
        zero, hole, dirty = extent_flags(context, status)
        last = out[-1] if out else None
        if last is not None and (last.zero, last.hole, last.dirty) == (zero, hole, dirty):
            out[-1] = Extent(last.start, last.length + step, zero, hole, dirty)
        else:
            out.append(Extent(pos, step, zero, hole, dirty))
        pos += step
    return out
