"""Shared by the replication tests and bench: a CA and two site certificates, a pair of
stores sharing keys, a receiver on loopback, and TCP proxies that count, cut or corrupt."""

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.io.s3 import S3Endpoint
from engine.replication import tls
from engine.replication.receiver import RECEIVER, PeerReceiver, PeerServer, build_peer_app
from engine.replication.sender import PeerTarget
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.keys import StoreKeys, read_key_file
from engine.store.layout import RemoteConfig, StoreConfig
from tests.conftest import CHEAP_KDF, PASSPHRASE


@dataclass(frozen=True)
class Pki:
    ca_dir: Path
    sender: tls.SiteFiles
    receiver: tls.SiteFiles

    def server_context(self) -> ssl.SSLContext:
        r = self.receiver
        return tls.server_context(r.cert, r.key, r.ca)

    def client_context(self) -> ssl.SSLContext:
        s = self.sender
        return tls.client_context(s.cert, s.key, s.ca)


def make_pki(directory: Path) -> Pki:
    ca_dir = directory / "ca"
    tls.init_ca(ca_dir)
    sender = tls.issue(ca_dir, "site-a", directory / "site-a", dns=["localhost"], ips=["127.0.0.1"])
    receiver = tls.issue(
        ca_dir, "site-b", directory / "site-b", dns=["localhost"], ips=["127.0.0.1"]
    )
    return Pki(ca_dir, sender, receiver)


def store_keys(store: Store) -> StoreKeys:
    return read_key_file(store.layout.default_key_file, store.config.store_id, PASSPHRASE)


def init_replica(
    path: Path,
    origin: Store,
    encrypted_only: bool = False,
    pack_size: int | None = None,
    bucket: S3Endpoint | None = None,
) -> Store:
    """A store sharing ``origin``'s keys (without the data key if ``encrypted_only``); its
    packs in ``bucket`` when given."""
    keys = store_keys(origin)
    if encrypted_only:
        keys = StoreKeys(id_key=keys.id_key, mac_key=keys.mac_key, data_key=None)
    config: StoreConfig = origin.config
    Store.init(
        path,
        chunk_size=config.chunk_size,
        encryption=config.encryption,
        pack_size=pack_size or config.pack_size,
        passphrase=PASSPHRASE,
        kdf=CHEAP_KDF,
        keys=keys,
        remote=None if bucket is None else RemoteConfig(bucket.url, bucket.bucket, "replica/"),
        s3_key=None if bucket is None else (bucket.access_key, bucket.secret_key),
    )
    return Store.open(path, passphrase=PASSPHRASE)


@asynccontextmanager
async def receiver(store: Store, pki: Pki) -> AsyncIterator[tuple[PeerServer, PeerReceiver]]:
    app = build_peer_app(store)
    async with PeerServer(app, "127.0.0.1", 0, pki.server_context()) as server:
        yield server, app[RECEIVER]


def target(pki: Pki, port: int, streams: int = 3, bwlimit: int | None = None) -> PeerTarget:
    return PeerTarget(
        name="site-b",
        url=f"https://127.0.0.1:{port}",
        ssl=pki.client_context(),
        streams=streams,
        bandwidth_limit=bwlimit,
    )


@dataclass
class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``port``. Counts bytes each way; optionally
    drops the connection that carries the ``cut_after``-th client byte (once), delays
    every forwarded block by ``delay`` seconds (half a round trip each way), or — with
    ``tls_pair`` (server ctx, client ctx) — terminates TLS and flips one byte inside the
    first record body it sees going to the receiver (``corrupt``)."""

    port: int
    cut_after: int | None = None
    delay: float = 0.0
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
    corrupt: bool = False
    up: int = 0
    down: int = 0
    connections: int = 0
    cuts: int = 0
    flips: int = 0
    listen_port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _lines: dict[
        asyncio.StreamWriter,
        tuple["asyncio.Queue[tuple[float, bytes | None]]", "asyncio.Task[None]"],
    ] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.up + self.down

    async def __aenter__(self) -> "Proxy":
        ctx = self.tls_pair[0] if self.tls_pair else None
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        ctx = self.tls_pair[1] if self.tls_pair else None
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
            )
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        done = asyncio.Event()
        a = asyncio.create_task(self._pipe(reader, up_writer, True, done, writer))
        b = asyncio.create_task(self._pipe(up_reader, writer, False, done, up_writer))
        self._tasks |= {a, b}
        await done.wait()
        for w in (writer, up_writer):
            w.close()
        await asyncio.gather(a, b, return_exceptions=True)
        self._tasks -= {a, b}
        self._writers -= {writer, up_writer}

    async def _delayed(self, dst: asyncio.StreamWriter, data: bytes | None) -> None:
        """Latency without a throughput cap: blocks wait in a queue until ``delay`` after
        they arrived; one writer task per direction delivers them in order."""
        state = self._lines.get(dst)
        if state is None:
            queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=512)

            async def deliver() -> None:
                loop = asyncio.get_running_loop()
                while True:
                    at, block = await queue.get()
                    if block is None:
                        return
                    if (wait := at - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    dst.write(block)
                    await dst.drain()

            task = asyncio.create_task(deliver())
            self._tasks.add(task)
            state = self._lines[dst] = (queue, task)
        queue, task = state
        await queue.put((asyncio.get_running_loop().time() + self.delay, data))
        if data is None:
            del self._lines[dst]
            try:
                await task
            finally:
                self._tasks.discard(task)

    def _maybe_flip(self, data: bytes) -> bytes:
        k = data.find(fmt.RECORD_MAGIC) if self.corrupt and not self.flips else -1
        if k < 0 or k + 60 >= len(data):
            return data
        buf = bytearray(data)
        buf[k + 60] ^= 0x01  # inside the payload (nonce or ciphertext): the CRC must catch it
        self.flips += 1
        return bytes(buf)

    def _cut_here(self, data: bytes) -> bool:
        return (
            self.cut_after is not None and not self.cuts and self.up + len(data) >= self.cut_after
        )

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        upstream: bool,
        done: asyncio.Event,
        other: asyncio.StreamWriter,
    ) -> None:
        try:
            while data := await src.read(1 << 16):
                if upstream:
                    data = self._maybe_flip(data)
                    if self._cut_here(data):
                        self.cuts += 1
                        data = data[: self.cut_after - self.up if self.cut_after else 0]
                        self.up += len(data)
                        dst.write(data)
                        other.transport.abort()
                        dst.transport.abort()
                        return
                    self.up += len(data)
                else:
                    self.down += len(data)
                if self.delay:
                    await self._delayed(dst, data)
                else:
                    dst.write(data)
                    await dst.drain()
            if self.delay:
                await self._delayed(dst, None)
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, ssl.SSLError):
            pass
        finally:
            done.set()
