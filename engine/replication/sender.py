"""The sending side: one snapshot pushed to one peer over one HTTP session pool.

::

    candidates (positional diff vs the last snapshot replicated to this peer; thread)
        │ batches of ≤ OFFER_BATCH unique ids
        ▼
    offer ──POST lacking──▶ receiver answers the ids it lacks
        │ lacking ids grouped into record batches of ≤ RECORD_BATCH_BYTES (by index length)
        ▼
    bounded queue ──▶ N stream workers (peer.streams), each: POST records, the records read
                      raw from packs (``Store.get_record``, no decode), through the shared
                      token bucket; the answer says they are durable
        │ a broken stream, 5xx or a refused batch (CRC in transit): ask again which of the
        │ batch the receiver lacks, send only those (``engine.util.retry`` backoff)
        ▼
    every batch durable ──▶ PUT each DiskMap ──▶ POST commit (the manifest file's bytes)

Memory: the ids offered in this session are kept in a set to offer each once (~100 bytes
per distinct changed chunk); record batches are streamed one record at a time.
"""

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import aiohttp
import msgspec
import structlog

from engine.config.models import PeerSection
from engine.core.errors import ChunkMissing, EngineError
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, ChunkId, short
from engine.replication import protocol as proto
from engine.replication.throttle import Throttle, TokenBucket, Unlimited
from engine.replication.tls import client_context
from engine.store.codec import check_crc
from engine.store.keys import StoreKeys
from engine.store.layout import Layout
from engine.store.manifest import Manifest
from engine.store.protocols import ChunkReader
from engine.util.retry import RetryPolicy, retry
from engine.util.tasks import run_group

log = structlog.get_logger("tessera.replication")

T = TypeVar("T")
# A cut stream or a restarting receiver: a few retries with backoff up to 5 s.
DEFAULT_RETRY: Final = RetryPolicy(attempts=6, base_delay=0.2, max_delay=5.0)
REQUEST_TIMEOUT: Final = 600.0  # seconds per request: a 16 MiB batch at 30 KB/s still fits
DISKMAP_READ: Final = 1 << 20


class SendingStore(ChunkReader, Protocol):
    """What a sender reads beyond ``ChunkReader``: the keys (the receiver compares their
    fingerprints), the snapshot's files as stored (its DiskMaps and manifest go over the
    wire byte for byte, via ``layout``) and the store's directory (per-peer state and the
    sender's journal live under it). A ``Store`` fits; the sender never writes to it."""

    @property
    def path(self) -> Path: ...

    @property
    def keys(self) -> StoreKeys: ...

    @property
    def layout(self) -> Layout: ...


@dataclass(frozen=True)
class PeerTarget:
    """Where and how to push: the peer's URL, the TLS context, streams, bandwidth."""

    name: str
    url: str
    ssl: ssl.SSLContext
    streams: int = 4
    bandwidth_limit: int | None = None  # bytes per second

    @classmethod
    def from_section(cls, section: PeerSection) -> "PeerTarget":
        return cls(
            name=section.name,
            url=section.url,
            ssl=client_context(section.cert_file, section.key_file, section.ca_file),
            streams=section.streams,
            bandwidth_limit=section.bandwidth_limit,
        )


async def request_pull(target: PeerTarget, vms: Sequence[str]) -> list[str]:
    """Ask ``target`` to push us the newest snapshot of each of ``vms`` (names or globs);
    returns the ids of the jobs it started. Raises PeerError with the peer's answer."""
    connector = aiohttp.TCPConnector(ssl=target.ssl)
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
            http.post(
                f"{target.url.rstrip('/')}{proto.PREFIX}/pull",
                data=msgspec.json.encode(proto.PullRequest(tuple(vms))),
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            raw = await response.read()
            if response.status != 202:
                reason = (
                    f"pull refused: HTTP {response.status} {raw[:300].decode(errors='replace')}"
                )
                raise proto.PeerError(peer=target.name, reason=reason)
            return list(msgspec.json.decode(raw, type=proto.PullAccepted).jobs)
    except aiohttp.ClientError as e:
        raise proto.PeerError(peer=target.name, reason=f"pull request failed: {e}") from e


@dataclass
class ReplicationStats:
    offered: int = 0  # distinct candidate ids offered to the receiver
    lacked: int = 0  # of those, the ids it lacked
    lacked_bytes: int = 0  # record bytes of the lacking ids (what must cross)
    chunks_sent: int = 0  # records put on the wire (resends counted again)
    chunks_skipped: int = 0  # offered ids the receiver already held
    record_bytes_sent: int = 0  # record bytes put on the wire (resends counted again)
    body_bytes: int = 0  # every request and response body (ids, records, maps, manifest, JSON)
    requests: int = 0
    retries: int = 0
    stored: int = 0  # records the receiver reported new
    batches: int = 0
    errors: list[str] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors"}


Progress = Callable[[ReplicationStats], None]


def candidate_batches(
    store: ChunkReader, manifest: Manifest, base: Manifest | None, size: int = proto.OFFER_BATCH
) -> Generator[list[bytes], None, None]:
    """Ids of ``manifest`` (config chunk and every non-zero slot) that differ from ``base``
    at the same slot of the same disk, each once, in batches. Blocking (DiskMap reads)."""
    seen: set[bytes] = set()
    batch: list[bytes] = []

    def add(cid: bytes) -> list[bytes] | None:
        nonlocal batch
        if cid == ZERO_ID or cid in seen:
            return None
        seen.add(cid)
        batch.append(cid)
        if len(batch) < size:
            return None
        out, batch = batch, []
        return out

    config = manifest.config
    base_config = base.config if base is not None else None
    unchanged = base_config is not None and config is not None and base_config == config
    if config is not None and not unchanged and (full := add(bytes.fromhex(config.chunk_id))):
        yield full
    base_disks = {d.disk_id: d for d in base.disks} if base is not None else {}
    for disk in manifest.disks:
        old = base_disks.get(disk.disk_id)
        with store.open_diskmap(manifest, disk) as dm:
            old_dm = store.open_diskmap(base, old) if base is not None and old else None
            try:
                old_blocks = old_dm.iter_blocks() if old_dm is not None else iter(())
                for block in dm.iter_blocks():
                    previous = next(old_blocks, b"")
                    for i in range(0, len(block), CHUNK_ID_SIZE):
                        cid = block[i : i + CHUNK_ID_SIZE]
                        if cid != previous[i : i + CHUNK_ID_SIZE] and (full := add(cid)):
                            yield full
            finally:
                if old_dm is not None:
                    old_dm.close()
    if batch:
        yield batch


class Sender:
    """One push session. Use ``async with Sender(...)``; the HTTP pool closes on exit."""

    def __init__(
        self,
        store: SendingStore,
        target: PeerTarget,
        *,
        progress: Progress | None = None,
        retry_policy: RetryPolicy = DEFAULT_RETRY,
        batch_bytes: int = proto.RECORD_BATCH_BYTES,
        offer_batch: int = proto.OFFER_BATCH,
        sender_name: str = "tessera",
    ):
        self.store = store
        self.target = target
        self.stats = ReplicationStats()
        self.progress = progress
        self.policy = retry_policy
        self.batch_bytes = batch_bytes
        self.offer_batch = offer_batch
        self.sender_name = sender_name
        self.session_id: str | None = None
        self.throttle: Throttle = (
            TokenBucket(target.bandwidth_limit) if target.bandwidth_limit else Unlimited()
        )
        self._http: aiohttp.ClientSession | None = None
        self._base = target.url.rstrip("/") + proto.PREFIX

    async def __aenter__(self) -> "Sender":
        connector = aiohttp.TCPConnector(ssl=self.target.ssl, limit=self.target.streams + 1)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- requests ---------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, data: Any = None, sent: int = 0, json: bool = True
    ) -> Any:
        """One request; returns decoded JSON (or bytes). Raises TransientPeerError (no
        answer, 5xx), BatchRejected (422 on records) or PeerError (other refusals)."""
        assert self._http is not None, "use Sender as an async context manager"
        self.stats.requests += 1
        url = self._base + path
        try:
            async with self._http.request(method, url, data=data) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, ConnectionError) as e:
            if (ours := _our_error(e)) is not None:
                raise ours from None  # the body failed here (our store), not the connection
            raise proto.TransientPeerError(
                peer=self.target.name, reason=f"{method} {path}: {type(e).__name__}: {e}"
            ) from e
        self.stats.body_bytes += sent + len(body)
        if response.status < 300:
            return msgspec.json.decode(body) if json else body
        try:
            reason = msgspec.json.decode(body, type=proto.Refusal).error
        except msgspec.DecodeError:
            reason = body[:200].decode(errors="replace")
        reason = f"{method} {path}: HTTP {response.status}: {reason}"
        if response.status >= 500:
            raise proto.TransientPeerError(peer=self.target.name, reason=reason)
        if response.status == 422 and path.endswith("/records"):
            raise proto.BatchRejected(peer=self.target.name, reason=reason)
        if response.status == 404 and path.startswith("/sessions/"):
            raise proto.SessionLost(peer=self.target.name, reason=reason)
        raise proto.PeerError(peer=self.target.name, reason=reason)

    async def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        def again(attempt: int, error: BaseException) -> None:
            self.stats.retries += 1
            self.stats.errors.append(str(error))
            log.warning("replication.retry", peer=self.target.name, what=what, error=str(error))

        return await retry(fn, policy=self.policy, on_retry=again)

    # -- session ----------------------------------------------------------------------------

    async def open(self, manifest: Manifest, base: str | None) -> proto.SessionOpened:
        offer = proto.OpenSession(
            protocol=proto.PROTOCOL_VERSION,
            sender=self.sender_name,
            snapshot_id=manifest.snapshot_id,
            vm_id=manifest.vm_id,
            vm_name=manifest.vm_name,
            chunk_size=self.store.config.chunk_size,
            keys=proto.key_fingerprint(self.store.keys),
            data_key=proto.data_key_fingerprint(self.store.keys),
            base=base,
        )
        body = msgspec.json.encode(offer)
        doc = await self._retry(
            "open", lambda: self._request("POST", "/sessions", body, sent=len(body))
        )
        opened = msgspec.convert(doc, proto.SessionOpened)
        # A receiver that holds the snapshot already keeps no session for it.
        self.session_id = None if opened.committed else opened.session
        return opened

    async def abort(self) -> None:
        if self.session_id is not None:
            await self._request("DELETE", f"/sessions/{self.session_id}")
            self.session_id = None

    async def lacking(self, ids: list[bytes]) -> list[bytes]:
        body = b"".join(ids)
        raw = await self._request(
            "POST", f"/sessions/{self.session_id}/lacking", body, sent=len(body), json=False
        )
        return proto.split_ids(raw)

    # -- transfer ---------------------------------------------------------------------------

    async def transfer(self, manifest: Manifest, base: Manifest | None) -> None:
        """Offer every candidate id, send what the receiver lacks over N streams; returns
        once every record it lacked is durable there."""
        queue: asyncio.Queue[list[tuple[bytes, int]] | None] = asyncio.Queue(
            maxsize=2 * self.target.streams
        )
        streams = self.target.streams

        async def produce() -> None:
            gen = candidate_batches(self.store, manifest, base, self.offer_batch)
            try:
                while (ids := await asyncio.to_thread(next, gen, None)) is not None:
                    self.stats.offered += len(ids)
                    missing: list[bytes] = await self._retry("lacking", partial(self.lacking, ids))
                    self.stats.chunks_skipped += len(ids) - len(missing)
                    for batch in await asyncio.to_thread(self._batches, missing):
                        await queue.put(batch)
            finally:
                gen.close()
            for _ in range(streams):  # not on failure: the group cancels the streams then
                await queue.put(None)

        async def stream() -> None:
            while (batch := await queue.get()) is not None:
                await self._send_batch(batch)

        def start(tg: asyncio.TaskGroup) -> None:
            tg.create_task(produce())
            for _ in range(streams):
                tg.create_task(stream())

        await run_group(start)

    def _batches(self, ids: list[bytes]) -> list[list[tuple[bytes, int]]]:
        """Group ids into record batches of at most ``batch_bytes`` (one record at least)."""
        out: list[list[tuple[bytes, int]]] = []
        batch: list[tuple[bytes, int]] = []
        size = 0
        for cid in ids:
            loc = self.store.locate(cid)
            if loc is None:
                raise ChunkMissing(chunk=short(cid), context=" (sender store; run verify)")
            if batch and size + loc.length > self.batch_bytes:
                out.append(batch)
                batch, size = [], 0
            batch.append((cid, loc.length))
            size += loc.length
            self.stats.lacked += 1
            self.stats.lacked_bytes += loc.length
        if batch:
            out.append(batch)
        return out

    async def _send_batch(self, batch: list[tuple[bytes, int]]) -> None:
        todo = batch
        first = True

        async def attempt() -> None:
            nonlocal todo, first
            if not first:  # resume: only what the receiver still lacks after the failure
                lacking = set(await self.lacking([cid for cid, _ in todo]))
                todo = [(cid, n) for cid, n in todo if cid in lacking]
            first = False
            if not todo:
                return
            sent = 0

            async def body() -> AsyncIterator[bytes]:
                # The next record is read (a thread) while this one goes out.
                nonlocal sent
                ahead = _read_ahead(self.store, todo[0][0])
                try:
                    for i in range(len(todo)):
                        record = await ahead
                        if i + 1 < len(todo):
                            ahead = _read_ahead(self.store, todo[i + 1][0])
                        await self.throttle.take(len(record))
                        sent += len(record)
                        self.stats.chunks_sent += 1
                        self.stats.record_bytes_sent += len(record)
                        yield record
                finally:
                    ahead.cancel()

            try:
                doc = await self._request("POST", f"/sessions/{self.session_id}/records", body())
            finally:
                self.stats.body_bytes += sent
            result = msgspec.convert(doc, proto.BatchResult)
            self.stats.stored += result.stored
            self.stats.batches += 1
            if self.progress is not None:
                self.progress(self.stats)

        await self._retry("records", attempt)

    # -- commit -----------------------------------------------------------------------------

    async def commit(self, manifest: Manifest) -> proto.Committed:
        """Send the DiskMaps, then the manifest (the receiver commits it last)."""
        snapshot_dir = self.store.layout.snapshot_dir(manifest.snapshot_id)
        for disk in manifest.disks:
            path = snapshot_dir / disk.diskmap

            async def put(path: Path = path, name: str = disk.diskmap) -> Any:
                size = path.stat().st_size
                return await self._request(
                    "PUT",
                    f"/sessions/{self.session_id}/diskmaps/{name}",
                    _file_body(path),
                    sent=size,
                )

            await self._retry("diskmap", put)
        raw = await asyncio.to_thread(self.store.layout.manifest(manifest.snapshot_id).read_bytes)
        doc = await self._retry(
            "commit",
            lambda: self._request("POST", f"/sessions/{self.session_id}/commit", raw, len(raw)),
        )
        self.session_id = None
        return msgspec.convert(doc, proto.Committed)


def _our_error(error: BaseException) -> EngineError | None:
    """The engine error a request body raised, which aiohttp wraps in a connection error."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, EngineError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _read_ahead(store: ChunkReader, chunk_id: bytes) -> "asyncio.Future[bytes]":
    def read_checked() -> bytes:
        # A record damaged in our own pack is an integrity error here (never retried), not
        # a refusal the receiver would answer to every resend.
        record, pack, offset = store.get_record(ChunkId(chunk_id))
        check_crc(record, pack, offset)
        return record

    async def read() -> bytes:
        return await asyncio.to_thread(read_checked)

    return asyncio.ensure_future(read())


async def _file_body(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while block := await asyncio.to_thread(f.read, DISKMAP_READ):
            yield block


def check_diskmaps(store: ChunkReader, manifest: Manifest) -> None:
    """Open each DiskMap through its manifest checksum (raises CorruptDiskMap)."""
    for disk in manifest.disks:
        with store.open_diskmap(manifest, disk):
            pass
