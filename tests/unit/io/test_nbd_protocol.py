"""The sans-IO NBD core alone: handshake exchanges, request encoding, reply parsing.

Every parser test also runs with the server's bytes cut into arbitrary fragments, because a
socket delivers them that way.
"""

import itertools
import pickle
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import TransientError
from engine.core.extent import Extent
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import (
    EINVAL,
    EIO,
    ENOSPC,
    ESHUTDOWN,
    NbdOptionError,
    NbdProtocolError,
    NbdRequestError,
    NbdTransientRequestError,
    request_error,
)
from engine.io.nbd.handshake import BlockSize, Handshake
from engine.io.nbd.transmission import Command, Transmission
from tests.unit.io import nbd_wire as w

DIRTY = "qemu:dirty-bitmap:b1"


def options_sent(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the client sent into (option, payload) pairs."""
    out = []
    while data:
        magic, option, length = p.OPTION_HEADER.unpack_from(data)
        assert magic == p.IHAVEOPT
        start = p.OPTION_HEADER.size
        out.append((option, data[start : start + length]))
        data = data[start + length :]
    return out


def feed(hs: Handshake, data: bytes, step: int | None = None) -> None:
    if step is None:
        hs.receive_data(data)
        return
    for i in range(0, len(data), step):
        hs.receive_data(data[i : i + step])


# --- handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 7])
def test_handshake_full_exchange(step: int | None) -> None:
    hs = Handshake("disk-1", [p.BASE_ALLOCATION, DIRTY])
    assert hs.data_to_send() == b""  # the server speaks first

    feed(hs, w.greeting(), step)
    sent = hs.data_to_send()
    assert sent[:4] == p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    assert options_sent(sent[4:]) == [(p.OPT_STRUCTURED_REPLY, b"")]

    feed(hs, w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK), step)
    ((option, payload),) = options_sent(hs.data_to_send())
    assert option == p.OPT_SET_META_CONTEXT
    expected = struct.pack(">I6sI", 6, b"disk-1", 2)
    expected += struct.pack(">I15s", 15, b"base:allocation")
    expected += struct.pack(">I20s", 20, DIRTY.encode())
    assert payload == expected

    feed(hs, w.meta_context(3, DIRTY) + w.meta_context(1, p.BASE_ALLOCATION), step)
    assert hs.data_to_send() == b""
    feed(hs, w.opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ACK), step)
    ((option, payload),) = options_sent(hs.data_to_send())
    assert option == p.OPT_GO
    assert payload == struct.pack(">I6sHH", 6, b"disk-1", 1, p.INFO_BLOCK_SIZE)

    assert not hs.done
    with pytest.raises(RuntimeError, match="not finished"):
        _ = hs.info
    answer = w.info_block_size(512, 4096, 32 << 20) + w.info_export(1 << 30)
    answer += w.opt_reply(p.OPT_GO, p.REP_INFO, b"\x00\x02described")  # ignored info type
    feed(hs, answer + w.opt_reply(p.OPT_GO, p.REP_ACK), step)
    assert hs.done
    info = hs.info
    assert info.name == "disk-1"
    assert info.size == 1 << 30
    assert info.block_size == BlockSize(512, 4096, 32 << 20)
    assert info.structured
    assert dict(info.contexts) == {p.BASE_ALLOCATION: 1, DIRTY: 3}
    assert info.can_flush
    assert info.can_zero
    assert not info.read_only
    assert not info.can_multi_conn


def test_handshake_without_structured_replies_skips_meta_contexts() -> None:
    hs = Handshake("", [p.BASE_ALLOCATION])
    hs.receive_data(w.greeting(p.FLAG_FIXED_NEWSTYLE))
    sent = hs.data_to_send()
    assert sent[:4] == p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES offered
    hs.receive_data(w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ERR_UNSUP))
    ((option, _),) = options_sent(hs.data_to_send())
    assert option == p.OPT_GO
    hs.receive_data(w.info_export(4096, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY))
    hs.receive_data(w.opt_reply(p.OPT_GO, p.REP_ACK))
    assert hs.info.structured is False
    assert dict(hs.info.contexts) == {}
    assert hs.info.read_only
    assert hs.info.block_size == BlockSize()  # spec defaults without NBD_INFO_BLOCK_SIZE


def test_handshake_meta_context_error_selects_nothing() -> None:
    hs = Handshake("", [p.BASE_ALLOCATION])
    hs.receive_data(w.greeting() + w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    hs.receive_data(w.meta_context(1, p.BASE_ALLOCATION))
    hs.receive_data(w.opt_reply(p.OPT_SET_META_CONTEXT, p.REP_ERR_TOO_BIG))
    hs.receive_data(w.info_export(4096) + w.opt_reply(p.OPT_GO, p.REP_ACK))
    assert dict(hs.info.contexts) == {}


def test_handshake_no_contexts_asked_goes_straight_to_go() -> None:
    hs = Handshake("", [])
    hs.receive_data(w.greeting() + w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    options = options_sent(hs.data_to_send()[4:])
    assert [o for o, _ in options] == [p.OPT_STRUCTURED_REPLY, p.OPT_GO]


def test_handshake_export_refused() -> None:
    hs = Handshake("nope", [])
    hs.receive_data(w.greeting() + w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    with pytest.raises(NbdOptionError) as info:
        hs.receive_data(w.opt_reply(p.OPT_GO, p.REP_ERR_UNKNOWN, b"export 'nope' not present"))
    message = str(info.value)
    assert "NBD_OPT_GO" in message
    assert "'nope'" in message
    assert "no such export" in message
    assert "export 'nope' not present" in message


def _after_structured() -> Handshake:
    hs = Handshake("", [p.BASE_ALLOCATION])
    hs.receive_data(w.greeting() + w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    return hs


@pytest.mark.parametrize(
    ("server_bytes", "message"),
    [
        (b"NOTMAGIC" + bytes(10), "not an NBD server"),
        (p.GREETING.pack(p.NBDMAGIC, p.OLDSTYLE_MAGIC, 0), "oldstyle"),
        (p.GREETING.pack(p.NBDMAGIC, 0x1234, 1), "bad newstyle magic"),
        (w.greeting(0), "fixed newstyle"),
    ],
)
def test_handshake_bad_greeting(server_bytes: bytes, message: str) -> None:
    with pytest.raises(NbdProtocolError, match=message):
        Handshake().receive_data(server_bytes)


@pytest.mark.parametrize(
    ("server_bytes", "message"),
    [
        (p.OPTION_REPLY_HEADER.pack(0xBAD, p.OPT_SET_META_CONTEXT, p.REP_ACK, 0), "magic"),
        (w.opt_reply(p.OPT_GO, p.REP_ACK), "reply to option 7 while waiting for"),
        (w.meta_context(1, "base:other"), "selected metadata context 'base:other'"),
        (w.meta_context(1, p.BASE_ALLOCATION) * 2, "selected twice"),
        (w.opt_reply(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, b"\x00"), "META_CONTEXT of 1"),
        (w.opt_reply(p.OPT_SET_META_CONTEXT, p.REP_SERVER), "unexpected NBD_REP_SERVER"),
        (
            p.OPTION_REPLY_HEADER.pack(
                p.OPTION_REPLY_MAGIC, p.OPT_SET_META_CONTEXT, p.REP_ACK, 1 << 20
            ),
            "reply of 1048576 bytes",
        ),
    ],
)
def test_handshake_bad_meta_context_replies(server_bytes: bytes, message: str) -> None:
    with pytest.raises(NbdProtocolError, match=message):
        _after_structured().receive_data(server_bytes)


def _at_go() -> Handshake:
    hs = Handshake("", [])
    hs.receive_data(w.greeting() + w.opt_reply(p.OPT_STRUCTURED_REPLY, p.REP_ACK))
    return hs


@pytest.mark.parametrize(
    ("server_bytes", "message"),
    [
        (w.opt_reply(p.OPT_GO, p.REP_ACK), "without NBD_INFO_EXPORT"),
        (w.opt_reply(p.OPT_GO, p.REP_INFO, b"\x00\x00" + bytes(4)), "NBD_INFO_EXPORT of 6"),
        (w.opt_reply(p.OPT_GO, p.REP_INFO, b"\x00"), "NBD_REP_INFO of 1 bytes"),
        (w.opt_reply(p.OPT_GO, p.REP_INFO, b"\x00\x03" + bytes(4)), "NBD_INFO_BLOCK_SIZE of 6"),
        (w.info_block_size(3, 4096, 1 << 20), "impossible block sizes minimum=3"),
        (w.info_block_size(4096, 4096, 512), "impossible block sizes"),
        (w.opt_reply(p.OPT_GO, p.REP_META_CONTEXT), "unexpected NBD_REP_META_CONTEXT"),
        (w.info_export(512) + w.opt_reply(p.OPT_GO, p.REP_ACK) + b"x", "after the handshake"),
    ],
)
def test_handshake_bad_go_replies(server_bytes: bytes, message: str) -> None:
    with pytest.raises(NbdProtocolError, match=message):
        _at_go().receive_data(server_bytes)


def test_handshake_rejects_unusable_arguments() -> None:
    with pytest.raises(ValueError, match="longer than 4096"):
        Handshake("x" * 5000)
    with pytest.raises(ValueError, match="only 'base:allocation'"):
        Handshake("", ["qemu:allocation-depth"])
    with pytest.raises(ValueError, match="only 'base:allocation'"):
        Handshake("", [p.DIRTY_BITMAP_PREFIX])


# --- requests --------------------------------------------------------------------------------

KINDS_AND_FLAGS = st.sampled_from(
    [
        (p.CMD_READ, 0),
        (p.CMD_WRITE, 0),
        (p.CMD_FLUSH, 0),
        (p.CMD_DISC, 0),
        (p.CMD_WRITE_ZEROES, 0),
        (p.CMD_WRITE_ZEROES, p.CMD_FLAG_NO_HOLE),
        (p.CMD_BLOCK_STATUS, 0),
        (p.CMD_BLOCK_STATUS, p.CMD_FLAG_REQ_ONE),
    ]
)


@settings(max_examples=200)
@given(
    kind_flags=KINDS_AND_FLAGS,
    cookie=st.integers(0, p.MAX_U64),
    offset=st.integers(0, 2**63),
    length=st.integers(0, p.MAX_U32),
)
def test_request_round_trip(
    kind_flags: tuple[int, int], cookie: int, offset: int, length: int
) -> None:
    kind, flags = kind_flags
    header = p.encode_request(kind, cookie, offset, length, flags)
    assert len(header) == 28
    assert header[:4] == b"\x25\x60\x95\x13"
    assert p.decode_request(header) == p.Request(flags, kind, cookie, offset, length)


def test_request_layout_is_the_spec_layout() -> None:
    header = p.encode_request(p.CMD_WRITE_ZEROES, 0x0102030405060708, 4096, 512, 2)
    assert header.hex() == "25609513000200060102030405060708000000000000100000000200"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((p.CMD_TRIM, 1, 0, 0, 0), "not supported"),
        ((p.CMD_READ, 1, 0, 1, p.CMD_FLAG_REQ_ONE), "not valid for NBD_CMD_READ"),
        ((p.CMD_READ, 1, 0, 2**32, 0), "do not fit"),
        ((p.CMD_READ, 1, -1, 1, 0), "do not fit"),
        ((p.CMD_READ, 1, p.MAX_U64, 1, 0), "do not fit"),
        ((p.CMD_READ, 2**64, 0, 1, 0), "cookie"),
    ],
)
def test_request_encoding_refuses_what_cannot_be_sent(
    args: tuple[int, int, int, int, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        p.encode_request(*args)


def test_decode_request_rejects_garbage() -> None:
    with pytest.raises(NbdProtocolError, match="bad request magic"):
        p.decode_request(bytes(28))
    with pytest.raises(NbdProtocolError, match="27 bytes"):
        p.decode_request(bytes(27))


# --- transmission ----------------------------------------------------------------------------


def receive(t: Transmission, data: bytes, cuts: list[int] | None = None) -> list[Command]:
    """Feed ``data`` whole, or cut at the given positions."""
    if not cuts:
        return t.receive_data(data)
    finished = []
    edges = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            finished += t.receive_data(data[a:b])
    return finished


def read_request(t: Transmission, offset: int, length: int) -> tuple[Command, bytearray]:
    buf = bytearray(b"\xee" * length)
    command, header = t.request(p.CMD_READ, offset, length, buf=memoryview(buf))
    assert p.decode_request(header) == p.Request(0, p.CMD_READ, command.cookie, offset, length)
    return command, buf


CUTS = st.lists(st.integers(0, 10_000), max_size=12)


@settings(max_examples=100)
@given(cuts=CUTS)
def test_structured_read_out_of_order_chunks_and_holes(cuts: list[int]) -> None:
    t = Transmission(structured=True)
    command, buf = read_request(t, 8192, 4096)
    data = (
        w.data_chunk(command.cookie, 8192 + 3000, b"C" * 1096)
        + w.hole_chunk(command.cookie, 8192 + 1000, 2000)
        + w.data_chunk(command.cookie, 8192, b"A" * 1000)
        + w.none_chunk(command.cookie)
    )
    assert receive(t, data, cuts) == [command]
    assert command.failure is None
    assert bytes(buf) == b"A" * 1000 + bytes(2000) + b"C" * 1096
    assert t.in_flight == 0


@settings(max_examples=100)
@given(cuts=CUTS)
def test_pipelined_replies_interleave(cuts: list[int]) -> None:
    t = Transmission(structured=True, context_ids=[1])
    read1, buf1 = read_request(t, 0, 100)
    read2, buf2 = read_request(t, 100, 50)
    status, _ = t.request(p.CMD_BLOCK_STATUS, 0, 1 << 20)
    flush, _ = t.request(p.CMD_FLUSH, 0, 0)
    assert len({read1.cookie, read2.cookie, status.cookie, flush.cookie}) == 4
    data = (
        w.data_chunk(read2.cookie, 100, b"y" * 50)
        + w.simple(flush.cookie)
        + w.data_chunk(read1.cookie, 0, b"x" * 60)
        + w.status_chunk(status.cookie, 1, [(4096, 0), (1 << 30, 3)], done=True)
        + w.data_chunk(read1.cookie, 60, b"z" * 40, done=True)
        + w.none_chunk(read2.cookie)
    )
    assert receive(t, data, cuts) == [flush, status, read1, read2]
    assert bytes(buf1) == b"x" * 60 + b"z" * 40
    assert bytes(buf2) == b"y" * 50
    assert status.statuses == {1: [(4096, 0), (1 << 30, 3)]}


@settings(max_examples=50)
@given(cuts=CUTS)
def test_simple_replies_without_structured(cuts: list[int]) -> None:
    t = Transmission(structured=False)
    command, buf = read_request(t, 0, 300)
    write, _ = t.request(p.CMD_WRITE, 0, 10)
    data = w.simple(write.cookie, error=ENOSPC) + w.simple(command.cookie, data=b"q" * 300)
    assert receive(t, data, cuts) == [write, command]
    assert bytes(buf) == b"q" * 300
    assert write.failure is not None
    assert write.failure.errno == ENOSPC


def test_read_payload_lands_in_the_callers_buffer() -> None:
    t = Transmission(structured=True)
    command, buf = read_request(t, 0, 1000)
    head = p.STRUCTURED_REPLY.pack(
        p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_OFFSET_DATA, command.cookie, 8 + 500
    )
    t.receive_data(head + p.U64.pack(500))
    view = t.get_buffer()
    assert view.obj is buf  # no intermediate buffer: the socket receives into the caller's
    assert len(view) == 500
    view[:] = b"d" * 500
    assert t.buffer_updated(500) == []
    assert bytes(buf[500:]) == b"d" * 500


def test_simple_read_error_has_no_payload() -> None:
    t = Transmission(structured=False)
    command, buf = read_request(t, 0, 100)
    assert t.receive_data(w.simple(command.cookie, error=EIO)) == [command]
    assert command.failure is not None
    assert command.failure.errno == EIO
    assert bytes(buf) == b"\xee" * 100


def test_error_chunks() -> None:
    t = Transmission(structured=True, context_ids=[1])
    read, _ = read_request(t, 4096, 4096)
    zero, _ = t.request(p.CMD_WRITE_ZEROES, 0, 1 << 20)
    status, _ = t.request(p.CMD_BLOCK_STATUS, 0, 4096)
    data = (
        w.error_chunk(read.cookie, EIO, "disk on fire", offset=6000, done=False)
        + w.data_chunk(read.cookie, 4096, b"x" * 100, done=True)
        + w.error_chunk(zero.cookie, ENOSPC)
        + w.chunk(status.cookie, p.REPLY_TYPE_FLAG_ERROR | 99, p.ERROR_HEAD.pack(EINVAL, 0) + b"?")
        + w.none_chunk(status.cookie)
    )
    assert t.receive_data(data) == [read, zero, status]
    assert read.failure is not None
    assert (read.failure.errno, read.failure.message, read.failure.offset) == (
        EIO,
        "disk on fire",
        6000,
    )
    assert zero.failure is not None
    assert (zero.failure.errno, zero.failure.message, zero.failure.offset) == (ENOSPC, "", None)
    assert status.failure is not None
    assert status.failure.errno == EINVAL  # unknown error types fail the request only


def test_block_status_with_req_one() -> None:
    t = Transmission(structured=True, context_ids=[0, 2])
    command, _ = t.request(p.CMD_BLOCK_STATUS, 0, 4096, flags=p.CMD_FLAG_REQ_ONE)
    data = w.status_chunk(command.cookie, 2, [(8192, 1)]) + w.status_chunk(
        command.cookie, 0, [(512, 0)], done=True
    )
    assert t.receive_data(data) == [command]
    assert command.statuses == {2: [(8192, 1)], 0: [(512, 0)]}


def test_abandoned_read_never_touches_the_buffer() -> None:
    t = Transmission(structured=True)
    command, buf = read_request(t, 0, 400_000)
    data = w.data_chunk(command.cookie, 0, b"a" * 300_000) + w.hole_chunk(
        command.cookie, 300_000, 100_000, done=True
    )
    t.receive_data(data[:1000])
    t.abandon(command)
    assert t.receive_data(data[1000:]) == [command]  # parsed to the end, cookie released
    assert bytes(buf[:972]) == b"a" * 972  # what arrived before abandon()
    assert bytes(buf[972:]) == b"\xee" * (400_000 - 972)
    assert t.in_flight == 0


def test_disconnect_ends_requests() -> None:
    t = Transmission(structured=True)
    header = t.disconnect()
    assert p.decode_request(header).kind == p.CMD_DISC
    with pytest.raises(RuntimeError, match="NBD_CMD_DISC was sent"):
        t.request(p.CMD_FLUSH, 0, 0)


def test_request_argument_checks() -> None:
    t = Transmission(structured=True)
    with pytest.raises(ValueError, match="writable buffer"):
        t.request(p.CMD_READ, 0, 10, buf=memoryview(bytes(10)))
    with pytest.raises(ValueError, match="writable buffer"):
        t.request(p.CMD_READ, 0, 10, buf=memoryview(bytearray(9)))
    with pytest.raises(ValueError, match="only READ"):
        t.request(p.CMD_WRITE, 0, 10, buf=memoryview(bytearray(10)))
    with pytest.raises(ValueError, match="metadata context"):
        t.request(p.CMD_BLOCK_STATUS, 0, 10)
    with pytest.raises(ValueError, match="disconnect"):
        t.request(p.CMD_DISC, 0, 0)
    assert t.in_flight == 0


def test_cookies_are_unique_while_in_flight() -> None:
    t = Transmission(structured=True)
    cookies = {t.request(p.CMD_FLUSH, 0, 0)[0].cookie for _ in range(100)}
    assert len(cookies) == 100
    assert {c.cookie for c in t.pending()} == cookies


# --- malformed replies -----------------------------------------------------------------------


def _malformed_cases() -> list[object]:
    # Cookie 1: READ [1000, 2000); cookie 2: BLOCK_STATUS [0, 4096) over context 5;
    # cookie 3: FLUSH.
    cases = [
        ("bad magic", b"\xde\xad\xbe\xef" + bytes(12), "bad reply magic 0xdeadbeef"),
        ("unknown cookie simple", w.simple(99), "simple reply for unknown cookie 99"),
        ("unknown cookie chunk", w.none_chunk(77), "unknown cookie 77"),
        ("simple reply to read", w.simple(1), "simple reply to READ cookie 1"),
        ("unknown type", w.chunk(3, 42, b"", done=True), "unknown structured reply type 42"),
        ("none with payload", w.chunk(3, p.REPLY_TYPE_NONE, b"x", done=True), "NONE chunk with 1"),
        ("none without done", w.chunk(3, p.REPLY_TYPE_NONE), "without the DONE flag"),
        ("data outside", w.data_chunk(1, 1900, b"x" * 200), r"OFFSET_DATA \[1900, 2100\) outside"),
        ("data before", w.data_chunk(1, 999, b"x"), "outside the request"),
        (
            "overlap",
            w.data_chunk(1, 1000, b"x" * 10) + w.hole_chunk(1, 1005, 10),
            r"OFFSET_HOLE \[1005, 1015\) overlaps",
        ),
        (
            "empty data",
            w.chunk(1, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(1000)),
            "OFFSET_DATA chunk of 8",
        ),
        (
            "hole length",
            w.chunk(1, p.REPLY_TYPE_OFFSET_HOLE, bytes(16)),
            "OFFSET_HOLE chunk of 16 bytes",
        ),
        ("hole size 0", w.hole_chunk(1, 1000, 0), "OFFSET_HOLE of size 0"),
        ("data to flush", w.data_chunk(3, 0, b"x"), "not valid for this command"),
        ("status to read", w.status_chunk(1, 5, [(1, 0)]), "not valid for this command"),
        ("short read", w.data_chunk(1, 1000, b"x" * 999, done=True), "only 999 bytes answered"),
        (
            "status length",
            w.chunk(2, p.REPLY_TYPE_BLOCK_STATUS, bytes(10)),
            "BLOCK_STATUS chunk of 10",
        ),
        ("status context", w.status_chunk(2, 6, [(1, 0)]), "unnegotiated context id 6"),
        (
            "status twice",
            w.status_chunk(2, 5, [(1, 0)]) + w.status_chunk(2, 5, [(1, 0)]),
            "second BLOCK_STATUS chunk",
        ),
        ("descriptor 0", w.status_chunk(2, 5, [(0, 0)]), "descriptor 0 has length 0"),
        ("past the end", w.status_chunk(2, 5, [(4096, 0), (1, 0)]), "past the requested 4096"),
        ("status missing", w.none_chunk(2), r"without context ids \[5\]"),
        ("error 0", w.error_chunk(3, 0), "error value 0"),
        (
            "message overrun",
            w.chunk(3, p.REPLY_TYPE_ERROR, p.ERROR_HEAD.pack(EIO, 50) + b"short", done=True),
            "error message of 50 bytes overruns",
        ),
        ("error head", w.chunk(3, p.REPLY_TYPE_ERROR, b"\x00\x00", done=True), "error chunk of 2"),
        ("error offset", w.error_chunk(1, EIO, offset=5000), "ERROR_OFFSET 5000 outside"),
        (
            "oversized",
            p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, 0, p.REPLY_TYPE_ERROR, 3, 1 << 24),
            "limit 16384",
        ),
    ]
    return [pytest.param(data, message, id=case) for case, data, message in cases]


@pytest.mark.parametrize(("data", "message"), _malformed_cases())
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_malformed_replies(data: bytes, message: str, byte_by_byte: bool) -> None:
    t = Transmission(structured=True, context_ids=[5])
    read_request(t, 1000, 1000)
    t.request(p.CMD_BLOCK_STATUS, 0, 4096)
    t.request(p.CMD_FLUSH, 0, 0)
    with pytest.raises(NbdProtocolError, match=message) as info:
        if byte_by_byte:
            for i in range(len(data)):
                t.receive_data(data[i : i + 1])
        else:
            t.receive_data(data)
    assert str(info.value).startswith("NBD protocol error: ")
    # The parser is dead: everything after raises the same error.
    with pytest.raises(NbdProtocolError, match=message):
        t.receive_data(w.simple(3))
    assert len(t.pending()) >= 2  # what was in flight is left for the driver to fail


def test_structured_chunk_without_negotiation() -> None:
    t = Transmission(structured=False)
    t.request(p.CMD_FLUSH, 0, 0)
    with pytest.raises(NbdProtocolError, match="structured replies were not negotiated"):
        t.receive_data(w.none_chunk(1))


# --- extents ---------------------------------------------------------------------------------


def test_to_extents_clips_and_merges() -> None:
    descriptors = [(100, 0), (100, 0), (50, 3), (50, 3), (1000, 0)]
    assert p.to_extents(p.BASE_ALLOCATION, 10, 280, descriptors) == [
        Extent(10, 200),
        Extent(210, 80, zero=True, hole=True),
    ]
    assert p.to_extents(DIRTY, 0, 1000, [(10, 1), (20, 0), (30, 1)]) == [
        Extent(0, 10, dirty=True),
        Extent(10, 20),
        Extent(30, 30, dirty=True),  # short answer: covers 60 of 1000
    ]
    assert p.to_extents(p.BASE_ALLOCATION, 0, 10, [(4, p.STATE_ZERO)]) == [Extent(0, 4, zero=True)]


@settings(max_examples=300)
@given(
    descriptors=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 3)), min_size=1, max_size=30),
    length=st.integers(1, 600),
    dirty=st.booleans(),
)
def test_to_extents_matches_a_byte_model(
    descriptors: list[tuple[int, int]], length: int, dirty: bool
) -> None:
    context = DIRTY if dirty else p.BASE_ALLOCATION
    model = [p.extent_flags(context, flags) for size, flags in descriptors for _ in range(size)]
    model = model[:length]
    extents = p.to_extents(context, 1000, length, descriptors)
    assert extents[0].start == 1000
    assert sum(e.length for e in extents) == len(model)
    for a, b in itertools.pairwise(extents):
        assert a.end == b.start
        assert not a.same_flags(b)  # merged
    expanded = [(e.zero, e.hole, e.dirty) for e in extents for _ in range(e.length)]
    assert expanded == model


def test_to_extents_refuses_empty_descriptor() -> None:
    with pytest.raises(NbdProtocolError, match="length 0"):
        p.to_extents(p.BASE_ALLOCATION, 0, 10, [(0, 0)])


def test_extent_value() -> None:
    assert Extent(5, 10).end == 15
    with pytest.raises(ValueError, match="empty or negative"):
        Extent(0, 0)
    with pytest.raises(ValueError, match="empty or negative"):
        Extent(-1, 5)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("errno", "transient"), [(EIO, True), (ESHUTDOWN, True), (EINVAL, False), (ENOSPC, False)]
)
def test_request_error_class_follows_errno(errno: int, transient: bool) -> None:
    error = request_error(
        server="unix:/s", command="READ", offset=4096, length=512, errno=errno, message="boom"
    )
    assert isinstance(error, NbdRequestError)
    assert isinstance(error, TransientError) is transient
    assert error.retryable is transient
    assert isinstance(error, NbdTransientRequestError) is transient
    assert error.errno == errno
    assert "offset=4096 length=512" in str(error)
    assert "(boom)" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)


def test_unknown_errno_is_named_by_number() -> None:
    error = request_error(
        server="h:1", command="WRITE", offset=0, length=1, errno=42, error_offset=7
    )
    assert str(error) == "NBD WRITE offset=0 length=1 failed on h:1: errno 42 (at offset 7)"
    assert not error.retryable
