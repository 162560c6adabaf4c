"""The sans-IO NBD server on bytes: against this repository's client machines (handshake,
transmission) and against hand-made bytes where the client never sends them."""

import pytest

from engine.io.nbd import protocol as p
from engine.io.nbd.errors import EINVAL, ENOSPC, EPERM, NbdOptionError, NbdProtocolError
from engine.io.nbd.handshake import Handshake
from engine.io.nbd.server import (
    BASE_ALLOCATION_ID,
    Data,
    Disconnect,
    ExportSpec,
    Hole,
    Ready,
    Request,
    ServerConnection,
    StartTls,
)
from engine.io.nbd.transmission import Transmission

SIZE = 10 * 65536
RO = ExportSpec("disk", SIZE, read_only=True, preferred_block=65536, multi_conn=True)
RW = ExportSpec("disk", SIZE, read_only=False, preferred_block=65536)


def server(export: ExportSpec = RO, tls: bool = False) -> ServerConnection:
    return ServerConnection({"": export, export.name: export}, [export.name], tls=tls)


def handshake(
    srv: ServerConnection, name: str = "", contexts: tuple[str, ...] = (p.BASE_ALLOCATION,)
) -> tuple[Handshake, list[object]]:
    """Run the repository's client handshake against ``srv``; (client, server events)."""
    client = Handshake(name, contexts)
    events: list[object] = []
    client.receive_data(srv.data_to_send())
    while not client.done:
        events += srv.receive_data(client.data_to_send())
        client.receive_data(srv.data_to_send())
    return client, events


def connected(
    export: ExportSpec = RO, contexts: tuple[str, ...] = (p.BASE_ALLOCATION,)
) -> tuple[ServerConnection, Transmission]:
    srv = server(export)
    client, _ = handshake(srv, contexts=contexts)
    info = client.info
    return srv, Transmission(structured=info.structured, context_ids=info.contexts.values())


def raw_start(srv: ServerConnection, flags: int = p.FLAG_C_FIXED_NEWSTYLE) -> None:
    assert srv.data_to_send()[:8] == p.NBDMAGIC
    assert srv.receive_data(p.CLIENT_FLAGS.pack(flags)) == []


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        _, option, reply, length = p.OPTION_REPLY_HEADER.unpack_from(data)
        head = p.OPTION_REPLY_HEADER.size
        out.append((option, reply, data[head : head + length]))
        data = data[head + length :]
    return out


def test_handshake_agrees_export_size_flags_block_sizes_and_allocation() -> None:
    srv = server()
    client, events = handshake(srv)
    info = client.info
    assert info.size == SIZE and info.read_only and info.can_multi_conn and info.can_flush
    assert info.structured and info.contexts == {p.BASE_ALLOCATION: BASE_ALLOCATION_ID}
    assert (info.block_size.minimum, info.block_size.preferred) == (1, 65536)
    assert info.block_size.maximum == p.MAX_REQUEST
    assert events == [Ready(RO, structured=True, allocation=True)]


def test_writable_export_flags() -> None:
    client, _ = handshake(server(RW))
    info = client.info
    assert not info.read_only and info.can_zero and not info.can_multi_conn
    assert info.flags & p.FLAG_SEND_TRIM and info.flags & p.FLAG_SEND_FUA


def test_unknown_export_is_refused_with_err_unknown() -> None:
    with pytest.raises(NbdOptionError, match="NBD_REP_ERR_UNKNOWN"):
        handshake(server(), name="other")


def test_list_unknown_option_starttls_and_abort() -> None:
    srv = server()
    raw_start(srv)
    srv.receive_data(p.encode_option(p.OPT_LIST))
    replies = option_replies(srv.data_to_send())
    assert replies == [
        (p.OPT_LIST, p.REP_SERVER, p.U32.pack(4) + b"disk"),
        (p.OPT_LIST, p.REP_ACK, b""),
    ]
    srv.receive_data(p.encode_option(99, b"xyz") + p.encode_option(p.OPT_STARTTLS))
    replies = option_replies(srv.data_to_send())
    assert [r[:2] for r in replies] == [(99, p.REP_ERR_UNSUP), (p.OPT_STARTTLS, p.REP_ERR_UNSUP)]
    events = srv.receive_data(p.encode_option(p.OPT_ABORT))
    assert option_replies(srv.data_to_send()) == [(p.OPT_ABORT, p.REP_ACK, b"")]
    assert isinstance(events[0], Disconnect) and srv.closed


def test_tls_required_refuses_every_option_but_starttls_and_abort_before_tls() -> None:
    srv = server(tls=True)
    raw_start(srv)
    go = p.U32.pack(0) + p.U16.pack(0)
    for option, data in [
        (p.OPT_LIST, b""),
        (p.OPT_STRUCTURED_REPLY, b""),
        (p.OPT_LIST_META_CONTEXT, p.U32.pack(0) + p.U32.pack(0)),
        (p.OPT_INFO, go),
        (p.OPT_GO, go),
        (99, b"xyz"),
    ]:
        assert srv.receive_data(p.encode_option(option, data)) == []
        ((got, reply, message),) = option_replies(srv.data_to_send())
        assert (got, reply) == (option, p.REP_ERR_TLS_REQD) and b"STARTTLS" in message
    assert not srv.tls and not srv.closed
    events = srv.receive_data(p.encode_option(p.OPT_ABORT))
    assert option_replies(srv.data_to_send()) == [(p.OPT_ABORT, p.REP_ACK, b"")]
    assert isinstance(events[0], Disconnect) and srv.closed


def test_tls_required_export_name_in_clear_closes_the_connection() -> None:
    srv = server(tls=True)
    raw_start(srv)
    with pytest.raises(NbdProtocolError, match="before TLS"):
        srv.receive_data(p.encode_option(p.OPT_EXPORT_NAME, b"disk"))
    assert srv.data_to_send() == b""  # no size, no flags: nothing about the export leaks


def starttls(srv: ServerConnection) -> None:
    """STARTTLS on a started machine: the ACK and the event, then the handshake "done"."""
    assert srv.receive_data(p.encode_option(p.OPT_STARTTLS)) == [StartTls()]
    assert option_replies(srv.data_to_send()) == [(p.OPT_STARTTLS, p.REP_ACK, b"")]
    assert not srv.tls
    srv.tls_started()
    assert srv.tls


def test_starttls_is_acked_then_the_whole_handshake_runs_over_tls() -> None:
    srv = server(tls=True)
    client = Handshake("", (p.BASE_ALLOCATION,))
    client.receive_data(srv.data_to_send())
    first = client.data_to_send()  # client flags, then NBD_OPT_STRUCTURED_REPLY
    flags, rest = first[: p.CLIENT_FLAGS.size], first[p.CLIENT_FLAGS.size :]
    assert srv.receive_data(flags) == []
    starttls(srv)
    events = srv.receive_data(rest)
    client.receive_data(srv.data_to_send())
    while not client.done:
        events += srv.receive_data(client.data_to_send())
        client.receive_data(srv.data_to_send())
    assert client.info.structured and client.info.contexts == {
        p.BASE_ALLOCATION: BASE_ALLOCATION_ID
    }
    assert events == [Ready(RO, structured=True, allocation=True)]


def test_the_client_machine_starts_tls_first_and_negotiates_inside() -> None:
    srv = server(tls=True)
    client = Handshake("", (p.BASE_ALLOCATION,), tls=True)
    client.receive_data(srv.data_to_send())
    # Flags, then STARTTLS alone: no option is sent in clear before it.
    assert srv.receive_data(client.data_to_send()) == [StartTls()]
    client.receive_data(srv.data_to_send())
    assert client.starting_tls and client.data_to_send() == b""
    with pytest.raises(NbdProtocolError, match="in clear after its STARTTLS ACK"):
        Handshake(tls=True).receive_data(  # a server talking in clear after its ACK
            p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE)
            + p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, p.OPT_STARTTLS, p.REP_ACK, 0)
            + b"x"
        )
    srv.tls_started()
    client.tls_started()
    events: list[object] = []
    while not client.done:
        events += srv.receive_data(client.data_to_send())
        client.receive_data(srv.data_to_send())
    assert client.info.structured and client.info.contexts
    assert events == [Ready(RO, structured=True, allocation=True)]


def test_a_client_that_wants_tls_never_goes_on_in_clear() -> None:
    with pytest.raises(NbdOptionError, match=r"NBD_OPT_STARTTLS.*NBD_REP_ERR_UNSUP"):
        handshake_tls(server(tls=False))


def handshake_tls(srv: ServerConnection) -> None:
    client = Handshake("", (), tls=True)
    client.receive_data(srv.data_to_send())
    while not client.starting_tls:
        srv.receive_data(client.data_to_send())
        client.receive_data(srv.data_to_send())


def test_second_starttls_and_starttls_with_data_are_invalid() -> None:
    srv = server(tls=True)
    raw_start(srv)
    srv.receive_data(p.encode_option(p.OPT_STARTTLS, b"x"))
    assert [r[:2] for r in option_replies(srv.data_to_send())] == [
        (p.OPT_STARTTLS, p.REP_ERR_INVALID)
    ]
    assert not srv.tls
    starttls(srv)
    assert srv.receive_data(p.encode_option(p.OPT_STARTTLS)) == []
    assert [r[:2] for r in option_replies(srv.data_to_send())] == [
        (p.OPT_STARTTLS, p.REP_ERR_INVALID)
    ]
    srv.receive_data(p.encode_option(p.OPT_LIST))  # after TLS, options are answered
    assert option_replies(srv.data_to_send())[-1][:2] == (p.OPT_LIST, p.REP_ACK)


def test_bytes_before_the_tls_handshake_break_the_protocol() -> None:
    srv = server(tls=True)
    raw_start(srv)
    # Pipelined with STARTTLS, before its ACK could arrive.
    with pytest.raises(NbdProtocolError, match="after NBD_OPT_STARTTLS"):
        srv.receive_data(p.encode_option(p.OPT_STARTTLS) + b"\x16\x03\x01")
    srv = server(tls=True)
    raw_start(srv)
    assert srv.receive_data(p.encode_option(p.OPT_STARTTLS)) == [StartTls()]
    with pytest.raises(NbdProtocolError, match="before the TLS handshake"):
        srv.receive_data(p.encode_option(p.OPT_LIST))


def test_tls_started_without_starttls_is_a_programming_error() -> None:
    srv = server(tls=True)
    raw_start(srv)
    with pytest.raises(RuntimeError, match="no TLS handshake pending"):
        srv.tls_started()


def test_option_data_too_big_is_skipped_and_refused() -> None:
    srv = server()
    raw_start(srv)
    big = 70 * 1024
    data = p.encode_option(p.OPT_GO, bytes(big))
    for i in range(0, len(data), 4096):  # in pieces: the skip spans receive calls
        srv.receive_data(data[i : i + 4096])
    assert [r[:2] for r in option_replies(srv.data_to_send())] == [(p.OPT_GO, p.REP_ERR_TOO_BIG)]
    srv.receive_data(p.encode_option(p.OPT_LIST))
    assert option_replies(srv.data_to_send())[-1][:2] == (p.OPT_LIST, p.REP_ACK)


def test_meta_context_needs_structured_replies_and_list_shows_allocation() -> None:
    srv = server()
    raw_start(srv)
    query = p.U32.pack(0) + p.U32.pack(1) + p.U32.pack(15) + p.BASE_ALLOCATION.encode()
    srv.receive_data(p.encode_option(p.OPT_SET_META_CONTEXT, query))
    assert option_replies(srv.data_to_send())[0][1] == p.REP_ERR_INVALID
    srv.receive_data(p.encode_option(p.OPT_STRUCTURED_REPLY))
    srv.data_to_send()
    srv.receive_data(p.encode_option(p.OPT_LIST_META_CONTEXT, p.U32.pack(0) + p.U32.pack(0)))
    replies = option_replies(srv.data_to_send())
    assert replies[0] == (
        p.OPT_LIST_META_CONTEXT,
        p.REP_META_CONTEXT,
        p.U32.pack(BASE_ALLOCATION_ID) + b"base:allocation",
    )
    assert replies[1][1] == p.REP_ACK
    other = p.U32.pack(0) + p.U32.pack(1) + p.U32.pack(9) + b"qemu:x:yz"
    srv.receive_data(p.encode_option(p.OPT_SET_META_CONTEXT, other))
    assert [r[1] for r in option_replies(srv.data_to_send())] == [p.REP_ACK]  # none selected


def test_client_without_fixed_newstyle_is_a_protocol_error() -> None:
    srv = server()
    srv.data_to_send()
    with pytest.raises(NbdProtocolError, match="fixed newstyle"):
        srv.receive_data(p.CLIENT_FLAGS.pack(0))


def test_export_name_option_sends_size_flags_and_padding() -> None:
    srv = server()
    raw_start(srv)
    events = srv.receive_data(p.encode_option(p.OPT_EXPORT_NAME, b"disk"))
    out = srv.data_to_send()
    assert out == p.U64.pack(SIZE) + p.U16.pack(RO.flags) + bytes(124)
    assert events == [Ready(RO, structured=False, allocation=False)]


def test_read_structured_data_and_hole_chunks() -> None:
    srv, tx = connected()
    buf = memoryview(bytearray(b"\xff" * 8192))
    command, header = tx.request(p.CMD_READ, 4096, 8192, buf=buf)
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request) and (request.offset, request.length) == (4096, 8192)
    reply = srv.reply_read(request, [Data(4096, b"a" * 4096), Hole(8192, 4096)])
    (done,) = tx.receive_data(b"".join(reply))
    assert done is command and command.failure is None
    assert bytes(buf) == b"a" * 4096 + bytes(4096)


def test_read_simple_replies_send_holes_as_zeroes() -> None:
    srv2 = server()  # a client that never asks for structured replies
    raw_start(srv2, p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
    go = p.U32.pack(0) + p.U16.pack(0)
    (ready,) = srv2.receive_data(p.encode_option(p.OPT_GO, go))
    assert isinstance(ready, Ready) and not ready.structured
    srv2.data_to_send()
    tx = Transmission(structured=False)
    buf = memoryview(bytearray(6))
    _command, header = tx.request(p.CMD_READ, 0, 6, buf=buf)
    (request,) = srv2.receive_data(header)
    assert isinstance(request, Request)
    (done,) = tx.receive_data(b"".join(srv2.reply_read(request, [Data(0, b"abc"), Hole(3, 3)])))
    assert done.failure is None and bytes(buf) == b"abc\0\0\0"


def test_read_pieces_must_cover_the_request() -> None:
    srv, tx = connected()
    _, header = tx.request(p.CMD_READ, 0, 10, buf=memoryview(bytearray(10)))
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request)
    with pytest.raises(ValueError, match="end at 5"):
        srv.reply_read(request, [Data(0, b"12345")])
    with pytest.raises(ValueError, match="does not follow"):
        srv.reply_read(request, [Hole(1, 9)])


@pytest.mark.parametrize(
    ("kind", "offset", "length", "errno"),
    [
        (p.CMD_READ, SIZE - 10, 20, EINVAL),  # past the end
        (p.CMD_READ, 0, p.MAX_REQUEST + 1, EINVAL),  # over the maximum block size
        (p.CMD_TRIM, 0, 4096, EPERM),  # read-only
        (p.CMD_WRITE_ZEROES, 0, 4096, EPERM),
        (p.CMD_CACHE, 0, 4096, EINVAL),  # not offered
        (p.CMD_BLOCK_STATUS, 0, 0, EINVAL),
    ],
)
def test_requests_refused_by_the_machine(kind: int, offset: int, length: int, errno: int) -> None:
    srv, _ = connected()
    header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, kind, 7, offset, length)
    assert srv.receive_data(header) == []
    out = srv.data_to_send()
    if kind in (p.CMD_READ, p.CMD_BLOCK_STATUS):  # structured error chunk
        _magic, flags, rtype, cookie, _n = p.STRUCTURED_REPLY.unpack_from(out)
        assert (rtype, cookie, flags) == (p.REPLY_TYPE_ERROR, 7, p.REPLY_FLAG_DONE)
        assert p.ERROR_HEAD.unpack_from(out, p.STRUCTURED_REPLY.size)[0] == errno
    else:
        assert out == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, errno, 7)


def test_unknown_command_and_flag_get_einval() -> None:
    srv, _ = connected()
    srv.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, 42, 1, 0, 0))
    assert srv.data_to_send() == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, EINVAL, 1)
    srv.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, p.CMD_FLAG_DF, p.CMD_FLUSH, 2, 0, 0))
    assert srv.data_to_send() == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, EINVAL, 2)


def test_write_on_read_only_is_eperm_and_its_payload_is_consumed() -> None:
    srv, tx = connected()
    header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 3, 0, 5000)
    events = srv.receive_data(header + b"x" * 3000)
    events += srv.receive_data(b"x" * 2000)
    assert events == []
    assert srv.data_to_send() == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, EPERM, 3)
    _, flush = tx.request(p.CMD_FLUSH, 0, 0)
    (request,) = srv.receive_data(flush)
    assert isinstance(request, Request) and request.kind == p.CMD_FLUSH


def test_write_past_the_end_is_enospc_and_a_valid_write_carries_its_data() -> None:
    srv, tx = connected(RW)
    srv.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 4, SIZE - 1, 2) + b"ab")
    assert srv.data_to_send() == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, ENOSPC, 4)
    command, header = tx.request(p.CMD_WRITE, 100, 3)
    (request,) = srv.receive_data(header + b"xyz")
    assert isinstance(request, Request) and request.data == b"xyz" and not request.fua
    (done,) = tx.receive_data(b"".join(srv.reply_ok(request)))
    assert done is command and command.failure is None
    command, header = tx.request(p.CMD_WRITE_ZEROES, 0, 4096, flags=p.CMD_FLAG_NO_HOLE)
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request) and request.kind == p.CMD_WRITE_ZEROES


def test_block_status_reply_and_req_one() -> None:
    srv, tx = connected()
    _command, header = tx.request(p.CMD_BLOCK_STATUS, 0, SIZE)
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request)
    status = [(65536, 0), (SIZE - 65536, p.STATE_HOLE | p.STATE_ZERO)]
    (done,) = tx.receive_data(b"".join(srv.reply_block_status(request, status)))
    assert done.statuses == {BASE_ALLOCATION_ID: status}
    _command, header = tx.request(p.CMD_BLOCK_STATUS, 0, SIZE, flags=p.CMD_FLAG_REQ_ONE)
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request)
    (done,) = tx.receive_data(b"".join(srv.reply_block_status(request, status)))
    assert done.statuses == {BASE_ALLOCATION_ID: status[:1]}


def test_block_status_without_a_context_is_einval() -> None:
    srv, _ = connected(contexts=())
    srv.receive_data(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, 9, 0, 4096))
    out = srv.data_to_send()
    assert p.ERROR_HEAD.unpack_from(out, p.STRUCTURED_REPLY.size)[0] == EINVAL


def test_error_reply_to_a_read_fails_that_request_only() -> None:
    srv, tx = connected()
    _command, header = tx.request(p.CMD_READ, 0, 10, buf=memoryview(bytearray(10)))
    (request,) = srv.receive_data(header)
    assert isinstance(request, Request)
    (done,) = tx.receive_data(b"".join(srv.reply_error(request, 5, "chunk x is damaged")))
    assert done.failure is not None and done.failure.errno == 5
    assert done.failure.message == "chunk x is damaged"


def test_disc_ends_the_session_and_bad_magic_is_a_protocol_error() -> None:
    srv, tx = connected()
    events = srv.receive_data(tx.disconnect())
    assert isinstance(events[0], Disconnect) and srv.closed
    srv, _ = connected()
    with pytest.raises(NbdProtocolError, match="magic"):
        srv.receive_data(p.REQUEST.pack(0x1234, 0, p.CMD_READ, 1, 0, 1))


def test_requests_split_anywhere_and_pipelined() -> None:
    srv, tx = connected(RW)
    wire = b""
    for i in range(3):
        _, header = tx.request(p.CMD_WRITE, i * 10, 10)
        wire += header + bytes([i]) * 10
    events = []
    for b in wire:
        events += srv.receive_data(bytes([b]))
    assert [(e.offset, e.data) for e in events if isinstance(e, Request)] == [
        (i * 10, bytes([i]) * 10) for i in range(3)
    ]
