"""A scripted in-process NBD server: a real handshake, then each request goes to a handler.

The handler decides what goes on the wire, so tests can answer out of order, short, wrong,
or not at all. The server serves a ``memory`` bytearray unless the handler says otherwise.
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

from engine.io.nbd import protocol as p
from tests.unit.io import nbd_wire as w

Handler = Callable[["FakeServer", p.Request, bytes], Awaitable[None]]


async def serve_memory(server: "FakeServer", req: p.Request, payload: bytes) -> None:
    """Answer like a well-behaved server backed by ``server.memory``."""
    if req.kind == p.CMD_READ:
        data = bytes(server.memory[req.offset : req.offset + req.length])
        server.send(w.data_chunk(req.cookie, req.offset, data, done=True))
    elif req.kind == p.CMD_WRITE:
        server.memory[req.offset : req.offset + req.length] = payload
        server.send(w.simple(req.cookie))
    elif req.kind == p.CMD_WRITE_ZEROES:
        server.memory[req.offset : req.offset + req.length] = bytes(req.length)
        server.send(w.simple(req.cookie))
    else:
        server.send(w.simple(req.cookie))


class FakeServer:
    def __init__(
        self,
        path: Path,
        handler: Handler = serve_memory,
        *,
        size: int = 1 << 20,
        structured: bool = True,
        contexts: tuple[str, ...] = (p.BASE_ALLOCATION,),
        flags: int = w.DEFAULT_FLAGS,
        block_size: tuple[int, int, int] | None = None,
        tcp: bool = False,
    ) -> None:
        self.path = path
        self.handler = handler
        self.memory = bytearray(size)
        self.structured = structured
        self.contexts = contexts
        self.flags = flags
        self.block_size = block_size
        self.tcp = tcp
        self.requests: list[p.Request] = []
        self.got_request = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.release = asyncio.Event()
        self.context_ids: dict[str, int] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Path | tuple[str, int]:
        if self.tcp:
            assert self._server is not None
            host, port = self._server.sockets[0].getsockname()[:2]
            return (host, port)
        return self.path

    def send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.transport.abort()

    async def __aenter__(self) -> "FakeServer":
        if self.tcp:
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        else:
            self._server = await asyncio.start_unix_server(self._connection, path=self.path)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writer = writer
        try:
            if await self._handshake(reader, writer):
                await self._transmission(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(w.greeting())
        await reader.readexactly(4)
        while True:
            _, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(16))
            data = await reader.readexactly(length)
            if option == p.OPT_STRUCTURED_REPLY:
                reply = p.REP_ACK if self.structured else p.REP_ERR_UNSUP
                writer.write(w.opt_reply(option, reply))
            elif option == p.OPT_SET_META_CONTEXT:
                for name in _queries(data):
                    if name in self.contexts:
                        self.context_ids[name] = self.contexts.index(name) + 1
                        writer.write(w.meta_context(self.context_ids[name], name))
                writer.write(w.opt_reply(option, p.REP_ACK))
            elif option == p.OPT_GO:
                out = w.info_export(len(self.memory), self.flags)
                if self.block_size is not None:
                    out += w.info_block_size(*self.block_size)
                writer.write(out + w.opt_reply(option, p.REP_ACK))
                return True
            else:
                return False

    async def _transmission(self, reader: asyncio.StreamReader) -> None:
        while True:
            req = p.decode_request(await reader.readexactly(p.REQUEST.size))
            payload = await reader.readexactly(req.length) if req.kind == p.CMD_WRITE else b""
            self.requests.append(req)
            self.got_request.set()
            if req.kind == p.CMD_DISC:
                self.disconnected.set()
                return
            await self.handler(self, req, payload)


def _queries(data: bytes) -> list[str]:
    (name_len,) = p.U32.unpack_from(data)
    pos = 4 + name_len
    (count,) = p.U32.unpack_from(data, pos)
    pos += 4
    out = []
    for _ in range(count):
        (n,) = p.U32.unpack_from(data, pos)
        out.append(data[pos + 4 : pos + 4 + n].decode())
        pos += 4 + n
    return out
