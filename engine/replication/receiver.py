"""The receiving side: an aiohttp application over one store, served with mutual TLS.

``build_peer_app(store)`` is what ``tessera peer serve`` runs and what the daemon mounts on
its peer listener (``PeerServer`` binds it with ``tls.server_context``: no client
certificate signed by the sites' CA, no connection). Routes (``protocol`` has the bodies)::

    POST   /peer/v1/sessions                     OpenSession → SessionOpened (lease taken)
    POST   /peer/v1/sessions/{id}/lacking        ids → the ids this store does not hold
    POST   /peer/v1/sessions/{id}/records        records as stored → BatchResult (durable)
    PUT    /peer/v1/sessions/{id}/diskmaps/{n}   DiskMap bytes → staged (fsynced .tmp)
    POST   /peer/v1/sessions/{id}/commit         manifest bytes → Committed (commit point)
    DELETE /peer/v1/sessions/{id}                abort: staged files go, the lease ends
    POST   /peer/v1/pull                         PullRequest → PullAccepted (``on_pull``)

Records: each one's CRC is checked (no key needed); when this store holds the data key (or
the record is not encrypted) it is decoded and re-hashed to its id too. Valid records go
through ``Store.put`` (deduplicated, appended to this store's packs); at the end of every
records request — complete, refused or broken — the store is flushed, so whatever the
answer says (and whatever arrived before a cut) is sealed and indexed, and the next
``lacking`` answer leaves it out. A damaged record ends the batch with 422 before it is put.
The receiver never deletes a record or a committed snapshot.

A session holds a store lease (GC keeps what it answered "have" for) until commit, abort,
or ``idle_timeout`` without requests (checked when sessions open); a new session for the
same snapshot replaces an older one (a sender that restarted).
"""

import asyncio
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from engine.core.errors import (
    ChunkMissing,
    CorruptDiskMap,
    CorruptRecord,
    EngineError,
    IntegrityError,
    ManifestTampered,
    SnapshotNotFound,
    StoreError,
    StoreWriteError,
)
from engine.core.ids import ChunkId, short
from engine.replication import protocol as proto
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.codec import check_crc
from engine.store.leases import Lease
from engine.store.manifest import Manifest
from engine.store.replica import SnapshotImport, check_snapshot_id

log = structlog.get_logger("tessera.replication")

DEFAULT_IDLE_TIMEOUT: Final = 3600.0  # seconds; a sender retrying a cut stream comes back sooner
DRAIN_LIMIT: Final = 2 * proto.RECORD_BATCH_BYTES  # body read after a refusal, then close

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ``on_pull(peer, vms)``: start pushing those VMs' newest snapshots to ``peer``; job ids.
PullHandler = Callable[[str, tuple[str, ...]], list[str]]


@dataclass
class _Session:
    id: str
    sender: str
    snapshot_id: str
    lease: Lease
    imp: SnapshotImport
    last_used: float = field(default_factory=time.monotonic)
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class ReceiverStats:
    sessions: int = 0
    records: int = 0
    stored: int = 0
    existing: int = 0
    bytes: int = 0
    refused_batches: int = 0
    committed: list[str] = field(default_factory=list)


class PeerReceiver:
    """The sessions of one store. Every store call runs in a thread (SQLite, fsync)."""

    def __init__(
        self,
        store: Store,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        on_commit: Callable[[Manifest, str | None], None] | None = None,
    ):
        """``on_commit(manifest, sender)`` hears of each committed snapshot (the daemon
        starts standby refreshes from it); it must not block."""
        self.on_commit = on_commit
        if not store.writable:
            raise ValueError("a replication receiver needs a store opened for writing")
        self.store = store
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, _Session] = {}
        self.stats = ReceiverStats()
        # Decode and re-hash records when we can: we hold the data key, or records are plain.
        self._can_decode = store.keys.data_key is not None
        self._max_record = fmt.max_record_size(store.config.chunk_size)
        self._local = threading.local()

    # -- sessions ---------------------------------------------------------------------------

    def _end(self, session: _Session, abort: bool) -> None:
        self.sessions.pop(session.id, None)
        try:
            if abort:
                session.imp.abort()
        finally:
            self.store.leases.end(session.lease)

    def close(self) -> None:
        """Abort every session but one that is committing (its commit ends it)."""
        for session in list(self.sessions.values()):
            if not session.commit_lock.locked():
                self._end(session, abort=True)

    def _sweep(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if now - session.last_used > self.idle_timeout and not session.commit_lock.locked():
                log.info("peer.session.expired", session=session.id, sender=session.sender)
                self._end(session, abort=True)

    def _session(self, request: web.Request) -> _Session:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            raise web.HTTPNotFound(
                text=msgspec.json.encode(proto.Refusal(error="no such session")).decode(),
                content_type="application/json",
            )
        session.last_used = time.monotonic()
        return session

    # -- handlers ---------------------------------------------------------------------------

    async def open_session(self, request: web.Request) -> web.Response:
        body = await _json(request, proto.OpenSession)
        store = self.store
        check_snapshot_id(body.snapshot_id)
        if body.protocol != proto.PROTOCOL_VERSION:
            return _refuse(409, f"protocol {body.protocol} (this receiver speaks 1)")
        if body.chunk_size != store.config.chunk_size:
            return _refuse(
                409, f"chunk size {body.chunk_size} differs from {store.config.chunk_size}"
            )
        if body.keys != proto.key_fingerprint(store.keys):
            return _refuse(403, "the stores do not share id and MAC keys")
        mine = proto.data_key_fingerprint(store.keys)
        if mine is not None and body.data_key is not None and body.data_key != mine:
            return _refuse(403, "the stores do not share the data key")
        self._sweep()
        for old in [s for s in self.sessions.values() if s.snapshot_id == body.snapshot_id]:
            log.info("peer.session.replaced", session=old.id, snapshot=old.snapshot_id)
            async with old.commit_lock:  # a commit under way ends first (see ``abort``)
                self._end(old, abort=True)
        committed = store.layout.manifest(body.snapshot_id).exists()
        base_held = body.base is not None and store.layout.manifest(body.base).exists()
        sender = _peer_name(request) or body.sender
        session_id = secrets.token_hex(12)
        if not committed:
            # The lease starts before the first "lacking" answer: whatever we say we hold,
            # GC keeps until the commit (store package docstring, lease (a)).
            lease = store.leases.begin("replication", f"{sender}:{body.snapshot_id}")
            self.sessions[session_id] = _Session(
                session_id, sender, body.snapshot_id, lease, SnapshotImport(store, body.snapshot_id)
            )
            self.stats.sessions += 1
        log.info(
            "peer.session.open",
            session=session_id,
            sender=sender,
            snapshot=body.snapshot_id,
            vm=body.vm_name,
            committed=committed,
        )
        answer = proto.SessionOpened(
            session=session_id,
            committed=committed,
            base_held=base_held,
            encrypted_only=store.keys.data_key is None,
        )
        return _json_response(answer)

    async def lacking(self, request: web.Request) -> web.Response:
        self._session(request)
        body = await _body(request, proto.OFFER_BATCH * 32, f"more than {proto.OFFER_BATCH} ids")
        try:
            ids = proto.split_ids(body)
        except ValueError as e:
            return _refuse(400, str(e))
        has = self.store.has
        missing = await asyncio.to_thread(lambda: [c for c in ids if not has(c)])
        return web.Response(body=b"".join(missing), content_type="application/octet-stream")

    async def records(self, request: web.Request) -> web.Response:
        """Read records one by one; each is checked and put in a thread while the next one
        is read (one in flight: reading and decoding overlap, memory stays two records)."""
        self._session(request)
        reader = request.content
        result = {"records": 0, "stored": 0, "existing": 0, "bytes": 0}
        accepting: asyncio.Future[bool] | None = None

        async def settle() -> None:
            nonlocal accepting
            if accepting is not None:
                fut, accepting = accepting, None
                stored = await fut
                result["records"] += 1
                result["stored" if stored else "existing"] += 1

        try:
            while (record := await self._read_record(reader, result["bytes"])) is not None:
                await settle()
                accepting = asyncio.ensure_future(
                    asyncio.to_thread(self._accept, record, result["bytes"])
                )
                result["bytes"] += len(record)
            await settle()
        except CorruptRecord as damaged:
            e = damaged
            if accepting is not None:
                # The framing of a record failed while the one before was being checked and
                # put: settle that one first. It is in the count if it was good, and it is
                # the damaged one to name if it was not.
                try:
                    await settle()
                except CorruptRecord as earlier:
                    e = earlier
            self.stats.refused_batches += 1
            log.warning("peer.records.refused", error=str(e))
            await _drain(reader)
            await self._flush()
            refusal = proto.Refusal(
                error=str(e), chunk=str(e.fields["chunk"]), durable=result["records"]
            )
            return _json_response(refusal, status=422)
        finally:
            if accepting is not None:  # a thread cannot be stopped: let its put finish
                await asyncio.gather(asyncio.shield(accepting), return_exceptions=True)
            self.stats.records += result["records"]
            self.stats.stored += result["stored"]
            self.stats.existing += result["existing"]
            self.stats.bytes += result["bytes"]
            # Durable before we answer — and after a cut too, so a retry's "lacking" skips
            # what did arrive. Shielded: a cancelled handler still seals what it put.
            await asyncio.shield(self._flush())
        return _json_response(proto.BatchResult(**result))

    async def _read_record(self, reader: Any, offset: int) -> bytes | None:
        """The next record of a body (framing checked, CRC not yet); None at a clean end."""
        try:
            head = await reader.readexactly(fmt.RECORD_HEADER.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None  # a clean end between records
            raise CorruptRecord(
                chunk="?", pack="(transit)", offset=offset, reason="truncated"
            ) from None
        magic, *_, payload_len, cid = fmt.RECORD_HEADER.unpack(head)
        size = fmt.RECORD_HEADER.size + payload_len + fmt.RECORD_CRC.size
        if magic != fmt.RECORD_MAGIC or size > self._max_record:
            raise CorruptRecord(
                chunk=short(cid), pack="(transit)", offset=offset, reason="bad record header"
            )
        try:
            return bytes(head + await reader.readexactly(size - len(head)))
        except asyncio.IncompleteReadError:
            raise CorruptRecord(
                chunk=short(cid), pack="(transit)", offset=offset, reason="truncated"
            ) from None

    async def _flush(self) -> None:
        await asyncio.to_thread(self.store.flush)

    def _accept(self, record: bytes, offset: int) -> bool:
        header = check_crc(record, "(transit)", offset)
        if self._can_decode or not header.flags & fmt.FLAG_ENCRYPTED:
            # Into a reused per-thread buffer: a fresh MiB per record page-faults (~15 %).
            out: bytearray | None = getattr(self._local, "out", None)
            if out is None or len(out) < header.plain_len:
                size = max(header.plain_len, self.store.config.chunk_size)
                out = self._local.out = bytearray(size)
            self.store.codec.decode_into(
                record, memoryview(out), header.chunk_id, "(transit)", offset
            )
        return self.store.put(ChunkId(header.chunk_id), record)

    async def diskmap(self, request: web.Request) -> web.Response:
        session = self._session(request)
        data = await _body(request, proto.MAX_DISKMAP_BYTES, "DiskMap too large")
        await asyncio.to_thread(session.imp.stage_diskmap, request.match_info["name"], data)
        return _json_response({"staged": request.match_info["name"], "bytes": len(data)})

    async def commit(self, request: web.Request) -> web.Response:
        session = self._session(request)
        raw = await _body(request, proto.MAX_MANIFEST_BYTES, "manifest too large")
        async with session.commit_lock:
            committing = asyncio.ensure_future(asyncio.to_thread(session.imp.commit, raw))
            try:
                manifest = await asyncio.shield(committing)
            finally:
                # A thread cannot be stopped: a cancelled handler keeps the lock until the
                # commit is over, so no abort runs beside it.
                await asyncio.gather(committing, return_exceptions=True)
        self._end(session, abort=False)
        self.stats.committed.append(manifest.snapshot_id)
        if self.on_commit is not None:
            try:
                self.on_commit(manifest, session.sender)
            except Exception as e:  # noqa: BLE001 - the replica is committed whatever it says
                log.warning("peer.on_commit_failed", snapshot=manifest.snapshot_id, error=str(e))
        log.info(
            "peer.snapshot.committed",
            snapshot=manifest.snapshot_id,
            vm=manifest.vm_name,
            sender=session.sender,
        )
        return _json_response(proto.Committed(manifest.snapshot_id, len(manifest.disks)))

    async def abort(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is not None:
            # Never beside the session's commit: the abort deletes an uncommitted snapshot's
            # directory, and one whose commit is renaming the manifest into it must not lose
            # its DiskMaps. Once the commit is over the abort finds it committed (or not).
            async with session.commit_lock:
                await asyncio.to_thread(self._end, session, True)
        return _json_response({"aborted": request.match_info["id"]})


def _pull_handler(on_pull: PullHandler | None) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /pull``: the peer named by its certificate asks for the newest snapshots of
    some VMs; ``on_pull(peer, vms)`` (the daemon) starts pushing them and names the jobs."""

    async def pull(request: web.Request) -> web.Response:
        if on_pull is None:
            return _refuse(404, "this site does not serve pulls (no daemon behind it)")
        peer = _peer_name(request)
        if peer is None:
            return _refuse(403, "a pull needs the peer's client certificate")
        body = await _json(request, proto.PullRequest)
        try:
            jobs = on_pull(peer, body.vms)
        except EngineError as e:
            return _refuse(409, str(e))
        return _json_response(proto.PullAccepted(tuple(jobs)), status=202)

    return pull


def _peer_name(request: web.Request) -> str | None:
    """The client certificate's common name (TLS verified it against the CA)."""
    if request.transport is None:
        return None
    cert: Any = request.transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def _body(request: web.Request, limit: int, what: str) -> bytes:
    """The whole body, refused with 413 past ``limit`` bytes (read in pieces as they come:
    ``StreamReader.read(n)`` returns what is buffered, not ``n`` bytes)."""
    if (request.content_length or 0) > limit:
        raise _http_refusal(web.HTTPRequestEntityTooLarge, what, limit, request.content_length)
    parts, size = [], 0
    async for part in request.content.iter_any():
        size += len(part)
        if size > limit:
            raise _http_refusal(web.HTTPRequestEntityTooLarge, what, limit, size)
        parts.append(part)
    return b"".join(parts)


def _http_refusal(
    kind: type[web.HTTPRequestEntityTooLarge], what: str, limit: int, size: int | None
) -> web.HTTPRequestEntityTooLarge:
    return kind(
        max_size=limit,
        actual_size=size or limit + 1,
        text=msgspec.json.encode(proto.Refusal(error=what)).decode(),
        content_type="application/json",
    )


async def _json(request: web.Request, kind: type[Any]) -> Any:
    raw = await _body(request, proto.MAX_JSON_BYTES, "request too large")
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as e:
        raise web.HTTPBadRequest(
            text=msgspec.json.encode(proto.Refusal(error=f"bad request: {e}")).decode(),
            content_type="application/json",
        ) from e


async def _drain(reader: Any) -> None:
    left = DRAIN_LIMIT
    try:
        while left > 0 and (chunk := await reader.read(min(left, 1 << 20))):
            left -= len(chunk)
    except Exception:  # noqa: BLE001 - a broken body after a refusal changes nothing
        return


def _json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(doc), status=status, content_type="application/json"
    )


def _refuse(status: int, message: str) -> web.Response:
    return _json_response(proto.Refusal(error=message), status=status)


# First match wins. A store that cannot write (a full disk) is ours: 5xx, which the sender
# retries. Any other store refusal is the request's (a DiskMap never sent or badly named,
# another chunk size): 4xx, which no retry can change.
_STATUS: Final[tuple[tuple[type[EngineError], int], ...]] = (
    (ManifestTampered, 403),
    (ChunkMissing, 409),
    (SnapshotNotFound, 400),
    (CorruptDiskMap, 422),
    (IntegrityError, 422),
    (StoreWriteError, 500),
    (StoreError, 409),
)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EngineError as e:
        status = next((s for kind, s in _STATUS if isinstance(e, kind)), 500)
        log.warning("peer.request.failed", path=request.path, status=status, error=str(e))
        return _refuse(status, str(e))


RECEIVER: Final = web.AppKey("peer_receiver", PeerReceiver)


def build_peer_app(
    store: Store,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    on_commit: Callable[[Manifest, str | None], None] | None = None,
    on_pull: PullHandler | None = None,
) -> web.Application:
    """The receiver application for ``store`` (opened for writing, shared keys). Serve it
    with ``PeerServer`` or any TLS listener using ``tls.server_context``; on cleanup every
    open session is aborted. ``app[RECEIVER]`` holds the sessions and counters."""
    receiver = PeerReceiver(store, idle_timeout, on_commit)
    app = web.Application(middlewares=[_errors], client_max_size=proto.MAX_JSON_BYTES)
    app[RECEIVER] = receiver
    p = proto.PREFIX
    app.add_routes(
        [
            web.post(f"{p}/sessions", receiver.open_session),
            web.post(f"{p}/sessions/{{id}}/lacking", receiver.lacking),
            web.post(f"{p}/sessions/{{id}}/records", receiver.records),
            web.put(f"{p}/sessions/{{id}}/diskmaps/{{name}}", receiver.diskmap),
            web.post(f"{p}/sessions/{{id}}/commit", receiver.commit),
            web.delete(f"{p}/sessions/{{id}}", receiver.abort),
            web.post(f"{p}/pull", _pull_handler(on_pull)),
        ]
    )

    async def cleanup(app: web.Application) -> None:
        receiver.close()

    app.on_cleanup.append(cleanup)
    return app


class PeerServer:
    """``app`` on ``host:port`` with ``context`` (port 0: any free port, see ``port``)."""

    def __init__(self, app: web.Application, host: str, port: int, context: ssl.SSLContext):
        self.app, self.host, self.port, self.context = app, host, port, context
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "PeerServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
