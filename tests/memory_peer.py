"""An in-memory replication peer: the receiving side of ``engine.replication`` over dicts.

The seam between a ``Sender`` and its peer is the HTTP protocol of
``engine.replication.protocol`` (routes under ``/peer/v1``, mutual TLS): the sender builds
its requests itself, with no transport object a test could swap. So the other
implementation of a peer is another aiohttp application speaking that protocol, served the
same way as the real one (``PeerServer`` with the sites' TLS contexts). ``MemoryPeer``
holds records by id and committed snapshots as the bytes of their manifest and DiskMaps,
and checks what a peer must check — written from the protocol's docstrings, not from the
receiver's code — with no store behind it. The product does not ship it.

::

    peer = MemoryPeer(keys, chunk_size)            # the sender's keys (shared, as sites do)
    async with PeerServer(peer.app(), "127.0.0.1", 0, server_context) as server:
        await run_replication(store=origin, target=PeerTarget(..., server.port ...), ...)
    peer.snapshots[snapshot_id]                    # {"manifest": bytes, "disk-0.dmap": bytes}

What it does, as the protocol says a receiver does:

- ``POST sessions``: refuses another protocol version or chunk size (409), keys that are
  not the sender's (403: id and MAC keys; the data key when both hold one), a snapshot id
  that is not one (400); a new session for a snapshot replaces an older one; a snapshot it
  holds gets ``committed`` and no session.
- ``lacking``: the offered ids it does not hold (at most ``OFFER_BATCH``: 413).
- ``records``: each record's framing and CRC checked, and when it can (it holds the data
  key, or the record is plaintext) decoded and re-hashed to its id; held before the answer.
  The first damaged record ends the batch with 422 (``Refusal``: the chunk, how many
  before it were held); it is not held.
- ``diskmaps/<name>``: staged in the session (a name that is not ``*.dmap``: 400).
- ``commit``: the manifest's MAC (403, also for another snapshot's manifest), its chunk size
  (409), each DiskMap staged (409) and matching its checksum (422), every chunk it names
  held (409, "… missing chunks"), then published; a refusal leaves the session as it was.
- ``DELETE``: the session and what it staged are dropped (an unknown one too: 200).
- ``pull``: ``on_pull(peer, vms)`` with the client certificate's common name (202), 409 when
  it raises an ``EngineError``, 404 without ``on_pull``.

An unknown session is 404 on every route under it. ``lose_sessions`` drops every session,
as a receiver that restarted does. Nothing is ever deleted but staged DiskMaps.
"""

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from engine.core.errors import (
    ChunkMissing,
    CorruptDiskMap,
    CorruptRecord,
    EngineError,
    ManifestTampered,
)
from engine.core.ids import CHUNK_ID_SIZE, ZERO_ID, short
from engine.replication import protocol as proto
from engine.store import diskmap
from engine.store import format as fmt
from engine.store import manifest as manifest_mod
from engine.store.codec import Codec, check_crc
from engine.store.keys import StoreKeys

PullHandler = Callable[[str, tuple[str, ...]], list[str]]

_SNAPSHOT_ID: Final = re.compile(r"^[0-9a-f]{8,64}$")
_DISKMAP_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}\.dmap$")


@dataclass
class PeerSession:
    id: str
    sender: str
    snapshot_id: str
    staged: dict[str, bytes] = field(default_factory=dict)  # DiskMap name → bytes


class Refuse(Exception):
    """A refusal: the handler answers ``status`` with a ``Refusal`` body."""

    def __init__(self, status: int, error: str, chunk: str | None = None, durable: int = 0):
        super().__init__(error)
        self.status = status
        self.refusal = proto.Refusal(error=error, chunk=chunk, durable=durable)


class MemoryPeer:
    """The receiving side of the peer protocol, in memory (module docstring)."""

    def __init__(
        self, keys: StoreKeys, chunk_size: int, on_pull: PullHandler | None = None
    ) -> None:
        self.keys = keys
        self.chunk_size = chunk_size
        self.on_pull = on_pull
        self.codec = Codec(keys)
        self.records: dict[bytes, bytes] = {}  # chunk id → record, as received
        self.snapshots: dict[str, dict[str, bytes]] = {}  # id → {"manifest"|name: bytes}
        self.sessions: dict[str, PeerSession] = {}
        self.refused_batches = 0

    def lose_sessions(self) -> None:
        """Forget every session and what it staged, as a receiver that restarted."""
        self.sessions.clear()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_refusals])
        p = proto.PREFIX
        app.add_routes(
            [
                web.post(f"{p}/sessions", self.open_session),
                web.post(f"{p}/sessions/{{id}}/lacking", self.lacking),
                web.post(f"{p}/sessions/{{id}}/records", self.receive_records),
                web.put(f"{p}/sessions/{{id}}/diskmaps/{{name}}", self.stage_diskmap),
                web.post(f"{p}/sessions/{{id}}/commit", self.commit),
                web.delete(f"{p}/sessions/{{id}}", self.abort),
                web.post(f"{p}/pull", self.pull),
            ]
        )
        return app

    def _session(self, request: web.Request) -> PeerSession:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            raise Refuse(404, "no such session")
        return session

    # -- handlers -------------------------------------------------------------------------

    async def open_session(self, request: web.Request) -> web.Response:
        offer = _decode(await _read(request, proto.MAX_JSON_BYTES), proto.OpenSession)
        if not _SNAPSHOT_ID.match(offer.snapshot_id):
            raise Refuse(400, f"snapshot {offer.snapshot_id[:80]}: not a snapshot id")
        if offer.protocol != proto.PROTOCOL_VERSION:
            raise Refuse(409, f"protocol {offer.protocol} (this peer speaks 1)")
        if offer.chunk_size != self.chunk_size:
            raise Refuse(409, f"chunk size {offer.chunk_size} differs from {self.chunk_size}")
        if offer.keys != proto.key_fingerprint(self.keys):
            raise Refuse(403, "the stores do not share id and MAC keys")
        mine = proto.data_key_fingerprint(self.keys)
        if mine is not None and offer.data_key is not None and offer.data_key != mine:
            raise Refuse(403, "the stores do not share the data key")
        for old in [s for s in self.sessions.values() if s.snapshot_id == offer.snapshot_id]:
            del self.sessions[old.id]
        committed = offer.snapshot_id in self.snapshots
        session_id = secrets.token_hex(12)
        if not committed:
            sender = _peer_name(request) or offer.sender
            self.sessions[session_id] = PeerSession(session_id, sender, offer.snapshot_id)
        return _answer(
            proto.SessionOpened(
                session=session_id,
                committed=committed,
                base_held=offer.base is not None and offer.base in self.snapshots,
                encrypted_only=self.keys.data_key is None,
            )
        )

    async def lacking(self, request: web.Request) -> web.Response:
        self._session(request)
        body = await _read(request, proto.OFFER_BATCH * CHUNK_ID_SIZE)
        try:
            ids = proto.split_ids(body)
        except ValueError as e:
            raise Refuse(400, str(e)) from e
        missing = b"".join(cid for cid in ids if cid not in self.records)
        return web.Response(body=missing, content_type="application/octet-stream")

    async def receive_records(self, request: web.Request) -> web.Response:
        self._session(request)
        content = request.content
        held = stored = received = 0
        try:
            while head := await content.read(fmt.RECORD_HEADER.size):
                head += await _exactly(content, fmt.RECORD_HEADER.size - len(head), received)
                magic, *_, payload_len, cid = fmt.RECORD_HEADER.unpack(head)
                size = fmt.RECORD_HEADER.size + payload_len + fmt.RECORD_CRC.size
                if magic != fmt.RECORD_MAGIC or size > fmt.max_record_size(self.chunk_size):
                    raise CorruptRecord(
                        chunk=short(cid), pack="(transit)", offset=received, reason="bad header"
                    )
                record = head + await _exactly(content, size - len(head), received, short(cid))
                header = check_crc(record, "(transit)", received)
                if self.keys.data_key is not None or not header.flags & fmt.FLAG_ENCRYPTED:
                    self.codec.decode(record, header.chunk_id, "(transit)", received)
                if header.chunk_id not in self.records:
                    self.records[header.chunk_id] = record
                    stored += 1
                held += 1
                received += len(record)
        except CorruptRecord as e:
            self.refused_batches += 1
            async for _ in content.iter_any():  # the rest of the batch goes unread
                pass
            raise Refuse(422, str(e), chunk=str(e.fields["chunk"]), durable=held) from e
        result = proto.BatchResult(
            records=held, stored=stored, existing=held - stored, bytes=received
        )
        return _answer(result)

    async def stage_diskmap(self, request: web.Request) -> web.Response:
        session = self._session(request)
        name = request.match_info["name"]
        if not _DISKMAP_NAME.match(name):
            raise Refuse(400, f"bad DiskMap name {name[:80]!r}")
        session.staged[name] = await _read(request, proto.MAX_DISKMAP_BYTES)
        return _answer({"staged": name, "bytes": len(session.staged[name])})

    async def commit(self, request: web.Request) -> web.Response:
        session = self._session(request)
        raw = await _read(request, proto.MAX_MANIFEST_BYTES)
        sid = session.snapshot_id
        manifest = manifest_mod.decode(raw, self.keys, sid, f"(replicated {sid})")  # 403
        if sid not in self.snapshots:
            if manifest.chunk_size != self.chunk_size:
                raise Refuse(409, f"snapshot {sid} has {manifest.chunk_size}-byte chunks")
            needed = [bytes.fromhex(manifest.config.chunk_id)] if manifest.config else []
            for disk in manifest.disks:
                staged = session.staged.get(disk.diskmap)
                if staged is None:
                    raise Refuse(409, f"snapshot {sid}: DiskMap {disk.diskmap} not received")
                _, _, ids = diskmap.decode(staged, disk.diskmap)  # CorruptDiskMap: 422
                if diskmap.parse_header(staged, disk.diskmap)[3].hex() != disk.diskmap_checksum:
                    raise CorruptDiskMap(path=disk.diskmap, reason="checksum differs")
                needed += [ids[i : i + CHUNK_ID_SIZE] for i in range(0, len(ids), CHUNK_ID_SIZE)]
            missing = sorted({c for c in needed if c != ZERO_ID and c not in self.records})
            if missing:
                error = ChunkMissing(
                    chunk=short(missing[0]),
                    context=f" (snapshot {sid} references {len(missing)} missing chunks)",
                )
                raise Refuse(409, str(error))
            files = {"manifest": raw} | {
                d.diskmap: session.staged[d.diskmap] for d in manifest.disks
            }
            self.snapshots[sid] = files
        self.sessions.pop(session.id, None)
        return _answer(proto.Committed(sid, len(manifest.disks)))

    async def abort(self, request: web.Request) -> web.Response:
        self.sessions.pop(request.match_info["id"], None)
        return _answer({"aborted": request.match_info["id"]})

    async def pull(self, request: web.Request) -> web.Response:
        if self.on_pull is None:
            raise Refuse(404, "this peer serves no pulls")
        peer = _peer_name(request)
        if peer is None:
            raise Refuse(403, "a pull needs the peer's client certificate")
        wanted = _decode(await _read(request, proto.MAX_JSON_BYTES), proto.PullRequest)
        try:
            jobs = self.on_pull(peer, wanted.vms)
        except EngineError as e:
            raise Refuse(409, str(e)) from e
        return _answer(proto.PullAccepted(tuple(jobs)), status=202)


_STATUS: Final[tuple[tuple[type[EngineError], int], ...]] = (
    (ManifestTampered, 403),
    (CorruptDiskMap, 422),
)


@web.middleware
async def _refusals(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except Refuse as e:
        return _answer(e.refusal, status=e.status)
    except EngineError as e:
        status = next((s for kind, s in _STATUS if isinstance(e, kind)), 500)
        return _answer(proto.Refusal(error=str(e)), status=status)
    return response


async def _read(request: web.Request, limit: int) -> bytes:
    parts, size = [], 0
    async for part in request.content.iter_any():
        size += len(part)
        if size > limit:
            raise Refuse(413, f"body over {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def _exactly(content: Any, n: int, offset: int, chunk: str = "?") -> bytes:
    data = b""
    while len(data) < n and (part := await content.read(n - len(data))):
        data += part
    if len(data) < n:
        raise CorruptRecord(chunk=chunk, pack="(transit)", offset=offset, reason="truncated")
    return data


def _decode(raw: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as e:
        raise Refuse(400, f"bad request: {e}") from e


def _answer(doc: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(doc), status=status, content_type="application/json"
    )


def _peer_name(request: web.Request) -> str | None:
    """The client certificate's common name (TLS checked it against the sites' CA)."""
    cert: Any = request.transport.get_extra_info("peercert") if request.transport else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
