"""Server-side byte builders for NBD tests: what a server would put on the wire."""

from engine.io.nbd import protocol as p

DEFAULT_FLAGS = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_WRITE_ZEROES


def greeting(flags: int = p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES) -> bytes:
    return p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, flags)


def opt_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def info_export(size: int, flags: int = DEFAULT_FLAGS) -> bytes:
    return opt_reply(p.OPT_GO, p.REP_INFO, p.INFO_EXPORT_LAYOUT.pack(p.INFO_EXPORT, size, flags))


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    payload = p.INFO_BLOCK_SIZE_LAYOUT.pack(p.INFO_BLOCK_SIZE, minimum, preferred, maximum)
    return opt_reply(p.OPT_GO, p.REP_INFO, payload)


def meta_context(context_id: int, name: str) -> bytes:
    payload = p.U32.pack(context_id) + name.encode()
    return opt_reply(p.OPT_SET_META_CONTEXT, p.REP_META_CONTEXT, payload)


def simple(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data


def chunk(cookie: int, kind: int, payload: bytes = b"", done: bool = False) -> bytes:
    flags = p.REPLY_FLAG_DONE if done else 0
    head = p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload))
    return head + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_OFFSET_DATA, p.U64.pack(offset) + data, done)


def hole_chunk(cookie: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE.pack(offset, size), done)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, p.REPLY_TYPE_NONE, done=True)


def status_chunk(
    cookie: int, context_id: int, descriptors: list[tuple[int, int]], done: bool = False
) -> bytes:
    payload = p.U32.pack(context_id) + b"".join(p.DESCRIPTOR.pack(*d) for d in descriptors)
    return chunk(cookie, p.REPLY_TYPE_BLOCK_STATUS, payload, done)


def error_chunk(
    cookie: int, errno: int, message: str = "", offset: int | None = None, done: bool = True
) -> bytes:
    raw = message.encode()
    payload = p.ERROR_HEAD.pack(errno, len(raw)) + raw
    kind = p.REPLY_TYPE_ERROR
    if offset is not None:
        payload += p.U64.pack(offset)
        kind = p.REPLY_TYPE_ERROR_OFFSET
    return chunk(cookie, kind, payload, done)
