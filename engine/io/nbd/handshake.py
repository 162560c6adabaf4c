"""The client side of the fixed newstyle handshake as a sans-IO state machine.

Drive it with bytes: feed everything the server sends to ``receive_data()``, send whatever
``data_to_send()`` returns, until ``done``; then ``info`` describes the export. The sequence of
options is drawn in ``protocol.py``. Raised from ``receive_data()``:

- ``NbdProtocolError`` for answers the spec does not allow (bad magic, an oldstyle or
  non-fixed server, a reply to an option not asked, an oversized reply, bytes after the end);
- ``NbdOptionError`` when the server refuses NBD_OPT_GO (unknown export, TLS required...).

With ``tls=True`` the first option is NBD_OPT_STARTTLS (as the spec advises a client that
wants TLS whatever the server requires: nothing is negotiated in clear). Its ACK sets
``starting_tls``: the caller runs the TLS handshake as the client over the same connection
and calls ``tls_started()``, and the rest goes on through TLS. Any other answer is
``NbdOptionError``: a client that asked for TLS never continues in clear (the spec's defence
against a downgrade by a man in the middle).

A server that refuses structured replies or metadata contexts is not an error: ``info`` then
says ``structured=False`` / has fewer ``contexts`` than asked, and the caller decides. A
server without NBD_OPT_GO (only very old ones lack it) is refused with
NbdOptionError: there is no fallback to NBD_OPT_EXPORT_NAME.
"""

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from engine.io.nbd import protocol as p
from engine.io.nbd.errors import NbdOptionError, NbdProtocolError

# Option replies carry at most a 4096-byte string plus a few fixed fields (spec); anything
# much larger is a broken or hostile server, refused before buffering it.
MAX_OPTION_REPLY: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class BlockSize:
    """Size constraints of an export (spec "Size constraints").

    Requests must be aligned to ``minimum``; ``preferred`` avoids read-modify-write;
    ``maximum`` bounds the payload of one READ or WRITE.
    """

    minimum: int = 1
    preferred: int = 4096
    maximum: int = p.MAX_REQUEST


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake agreed: the export, its flags, and the negotiated extensions."""

    name: str
    size: int
    flags: int
    block_size: BlockSize
    structured: bool
    contexts: Mapping[str, int] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & p.FLAG_SEND_FLUSH)

    @property
    def can_zero(self) -> bool:
        return bool(self.flags & p.FLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & p.FLAG_CAN_MULTI_CONN)


class _State(enum.Enum):
    GREETING = "waiting for the server greeting"
    OPTION = "waiting for an option reply"
    STARTING_TLS = "waiting for the TLS handshake"
    DONE = "in transmission"


class Handshake:
    """One handshake; not reusable. See the module docstring for the protocol of use."""

    def __init__(
        self, export_name: str = "", meta_contexts: Sequence[str] = (), *, tls: bool = False
    ) -> None:
        self._tls = tls
        self._name = p.encode_string(export_name, "export name")
        self._export_name = export_name
        for name in meta_contexts:
            p.check_context_name(name)
        self._wanted = tuple(dict.fromkeys(meta_contexts))  # ordered, no repeats
        self._in = bytearray()
        self._out = bytearray()
        self._state = _State.GREETING
        self._option = 0
        self._structured = False
        self._contexts: dict[str, int] = {}
        self._size: int | None = None
        self._flags = 0
        self._block_size = BlockSize()
        self._info: ExportInfo | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def starting_tls(self) -> bool:
        """STARTTLS was acknowledged: run the TLS handshake, then call ``tls_started()``.
        Until then no byte may be fed to ``receive_data`` (they would be TLS)."""
        return self._state is _State.STARTING_TLS

    def tls_started(self) -> None:
        """The TLS handshake is done: the handshake goes on (``data_to_send``), over TLS."""
        if self._state is not _State.STARTING_TLS:
            raise RuntimeError(f"no TLS handshake pending ({self._state.value})")
        self._send_option(p.OPT_STRUCTURED_REPLY)

    @property
    def info(self) -> ExportInfo:
        """The agreed export; only valid once ``done``."""
        if self._info is None:
            raise RuntimeError(f"the NBD handshake is not finished ({self._state.value})")
        return self._info

    def data_to_send(self) -> bytes:
        """Bytes the server must receive next (possibly empty); each call drains them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Consume bytes from the server, in pieces of any size."""
        self._in += data
        while not self.done and not self.starting_tls and self._step():
            pass
        if self.done and self._in:
            raise NbdProtocolError(reason="server sent data after the handshake ended")
        if self.starting_tls and self._in:
            raise NbdProtocolError(reason="server sent data in clear after its STARTTLS ACK")

    # --- steps: each consumes one complete message or returns False to wait for more -------

    def _step(self) -> bool:
        if self._state is _State.GREETING:
            return self._greeting()
        return self._option_reply()

    def _greeting(self) -> bool:
        if len(self._in) < p.GREETING.size:
            return False
        magic, opt_magic, flags = p.GREETING.unpack_from(self._in)
        del self._in[: p.GREETING.size]
        if magic != p.NBDMAGIC:
            raise NbdProtocolError(reason=f"not an NBD server: greeting starts {magic!r}")
        if opt_magic == p.OLDSTYLE_MAGIC:
            raise NbdProtocolError(reason="oldstyle NBD servers are not supported")
        if opt_magic != p.IHAVEOPT:
            raise NbdProtocolError(reason=f"bad newstyle magic {opt_magic:#x}")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(reason="server does not speak fixed newstyle negotiation")
        client_flags = p.FLAG_C_FIXED_NEWSTYLE
        if flags & p.FLAG_NO_ZEROES:
            client_flags |= p.FLAG_C_NO_ZEROES
        self._out += p.CLIENT_FLAGS.pack(client_flags)
        self._send_option(p.OPT_STARTTLS if self._tls else p.OPT_STRUCTURED_REPLY)
        return True

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._state = _State.OPTION
        self._out += p.encode_option(option, data)

    def _option_reply(self) -> bool:
        head = p.OPTION_REPLY_HEADER.size
        if len(self._in) < head:
            return False
        magic, option, reply, length = p.OPTION_REPLY_HEADER.unpack_from(self._in)
        if magic != p.OPTION_REPLY_MAGIC:
            raise NbdProtocolError(reason=f"bad option reply magic {magic:#x}")
        if option != self._option:
            raise NbdProtocolError(
                reason=f"reply to option {option} while waiting for {p.OPTION_NAMES[self._option]}"
            )
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(
                reason=f"{p.OPTION_NAMES[option]} reply of {length} bytes "
                f"(limit {MAX_OPTION_REPLY})"
            )
        if len(self._in) < head + length:
            return False
        payload = bytes(self._in[head : head + length])
        del self._in[: head + length]
        if option == p.OPT_STARTTLS:
            self._on_starttls(reply, payload)
        elif option == p.OPT_STRUCTURED_REPLY:
            self._on_structured_reply(reply)
        elif option == p.OPT_SET_META_CONTEXT:
            self._on_meta_context(reply, payload)
        else:
            self._on_go(reply, payload)
        return True

    def _on_starttls(self, reply: int, payload: bytes) -> None:
        if reply != p.REP_ACK:
            message = payload.decode("utf-8", errors="replace")
            raise NbdOptionError(
                option="NBD_OPT_STARTTLS",
                export=self._export_name,
                reply=p.REPLY_NAMES.get(reply, f"reply {reply:#x}"),
                detail=f": {message}" if message else "",
            )
        if payload:
            raise NbdProtocolError(reason=f"NBD_OPT_STARTTLS ACK with {len(payload)} bytes")
        self._state = _State.STARTING_TLS

    def _on_structured_reply(self, reply: int) -> None:
        if reply == p.REP_ACK:
            self._structured = True
        elif not reply & p.REP_FLAG_ERROR:
            raise self._unexpected(reply)
        # An error (usually ERR_UNSUP) leaves simple replies: reads work, block status does not.
        if self._structured and self._wanted:
            data = bytearray(p.U32.pack(len(self._name)) + self._name)
            data += p.U32.pack(len(self._wanted))
            for name in self._wanted:
                raw = name.encode("utf-8")
                data += p.U32.pack(len(raw)) + raw
            self._send_option(p.OPT_SET_META_CONTEXT, bytes(data))
        else:
            self._send_go()

    def _on_meta_context(self, reply: int, payload: bytes) -> None:
        if reply == p.REP_META_CONTEXT:
            if len(payload) < p.U32.size:
                raise NbdProtocolError(reason=f"NBD_REP_META_CONTEXT of {len(payload)} bytes")
            (context_id,) = p.U32.unpack_from(payload)
            name = payload[p.U32.size :].decode("utf-8", errors="replace")
            if name not in self._wanted:
                raise NbdProtocolError(reason=f"server selected metadata context {name!r}")
            if name in self._contexts or context_id in self._contexts.values():
                raise NbdProtocolError(
                    reason=f"metadata context {name!r} id {context_id} selected twice"
                )
            self._contexts[name] = context_id
        elif reply == p.REP_ACK:
            self._send_go()
        elif reply & p.REP_FLAG_ERROR:
            # The spec: on error, disregard the contexts already sent; none is selected.
            self._contexts.clear()
            self._send_go()
        else:
            raise self._unexpected(reply)

    def _send_go(self) -> None:
        # Asking for NBD_INFO_BLOCK_SIZE promises to honour the constraints it returns.
        info_requests = (p.INFO_BLOCK_SIZE,)
        data = p.U32.pack(len(self._name)) + self._name + p.U16.pack(len(info_requests))
        data += b"".join(p.U16.pack(kind) for kind in info_requests)
        self._send_option(p.OPT_GO, data)

    def _on_go(self, reply: int, payload: bytes) -> None:
        if reply == p.REP_INFO:
            self._on_info(payload)
        elif reply == p.REP_ACK:
            if self._size is None:
                raise NbdProtocolError(reason="NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
            self._info = ExportInfo(
                name=self._export_name,
                size=self._size,
                flags=self._flags,
                block_size=self._block_size,
                structured=self._structured,
                contexts=dict(self._contexts),
            )
            self._state = _State.DONE
        elif reply & p.REP_FLAG_ERROR:
            message = payload.decode("utf-8", errors="replace")
            raise NbdOptionError(
                option="NBD_OPT_GO",
                export=self._export_name,
                reply=p.REPLY_NAMES.get(reply, f"error reply {reply:#x}"),
                detail=f": {message}" if message else "",
            )
        else:
            raise self._unexpected(reply)

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise NbdProtocolError(reason=f"NBD_REP_INFO of {len(payload)} bytes")
        (kind,) = p.U16.unpack_from(payload)
        if kind == p.INFO_EXPORT:
            if len(payload) != p.INFO_EXPORT_LAYOUT.size:
                raise NbdProtocolError(reason=f"NBD_INFO_EXPORT of {len(payload)} bytes, not 12")
            _, self._size, self._flags = p.INFO_EXPORT_LAYOUT.unpack(payload)
        elif kind == p.INFO_BLOCK_SIZE:
            if len(payload) != p.INFO_BLOCK_SIZE_LAYOUT.size:
                raise NbdProtocolError(
                    reason=f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, not 14"
                )
            _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE_LAYOUT.unpack(payload)
            self._block_size = _check_block_size(minimum, preferred, maximum)
        # Other information types are ignored, as the spec requires.

    def _unexpected(self, reply: int) -> NbdProtocolError:
        return NbdProtocolError(
            reason=f"unexpected {p.REPLY_NAMES.get(reply, f'reply type {reply:#x}')} "
            f"to {p.OPTION_NAMES[self._option]}"
        )


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_block_size(minimum: int, preferred: int, maximum: int) -> BlockSize:
    # Spec: minimum a power of two <= 64 KiB; preferred a power of two >= max(minimum, 512);
    # maximum >= preferred. Only what this client relies on is enforced: a usable minimum
    # and a maximum at least as large (preferred is a hint).
    if not _power_of_two(minimum) or minimum > 64 * 1024 or maximum < minimum:
        raise NbdProtocolError(
            reason=f"impossible block sizes minimum={minimum} preferred={preferred} "
            f"maximum={maximum}"
        )
    return BlockSize(minimum, preferred, maximum)
