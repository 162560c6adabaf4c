"""The replication peer contract: every implementation runs these tests through ``peer``.

The seam is the peer protocol (``engine.replication.protocol``, routes under ``/peer/v1``
over mutual TLS): the ``Sender`` builds its HTTP requests itself, so a peer is anything that
answers them, and the suite talks to each implementation through the real ``Sender`` (and
``run_replication``, ``request_pull``) where the sender can say it, and through plain HTTP
requests where a test must send what a sender never would (damaged records, foreign
manifests). What a sender relies on, from ``engine.replication``'s docstrings and the
sender's handling of answers (5xx: retried; 422 on records: the batch resent; 404 under a
session: the session is lost, a new one is opened; other 4xx: the job fails):

- Sessions. ``open`` answers a session for a snapshot the peer lacks (``committed`` False,
  nothing visible yet), ``committed`` and no session for one it holds, ``base_held`` for a
  diff base it holds, ``encrypted_only`` when it holds no data key. It refuses a peer that
  does not share the id and MAC keys or (holding one) the data key (403), another chunk
  size or protocol version (409), a snapshot id that is not one, a malformed offer (400),
  all before any session exists. A new session for a snapshot replaces the older one (404
  from then on); an unknown session is 404 on every route; ``DELETE`` drops a session and
  what it staged (and answers 200 for one it does not know).
- ``lacking`` answers exactly the offered ids the peer does not hold; a full ``OFFER_BATCH``
  is answered, more is 413, a body that is not whole ids is 400.
- ``records``: a batch is held when answered (``BatchResult``: records, stored, existing,
  bytes), so the next ``lacking`` leaves it out; a batch sent again is all ``existing``.
  The first damaged record (CRC, framing, truncation; content too where the peer can
  decode) ends the batch with 422 naming the chunk: it is not held, the records before it
  are (``durable``). An encrypted-only peer cannot see a record whose content is not its
  id's, and holds it (the sites' documented limit).
- ``commit`` publishes the snapshot byte for byte (manifest and DiskMaps as sent, every
  record as the sender holds it) and only then: staged DiskMaps and received records are
  not a snapshot. It refuses a manifest that fails its MAC or is another snapshot's (403),
  a DiskMap damaged or not its manifest's (422), a DiskMap never sent (409) or badly named
  (4xx: never retried), and a snapshot naming a chunk the peer lacks (409, "missing
  chunks": the job resends every id and commits again in the same session); a refused
  commit publishes nothing and leaves the session usable. After a commit the session is
  over (404), the snapshot ``committed``.
- A lost session (the peer restarted) drops what it staged, never records: the job opens a
  new one, resends only what the peer lacks, and commits; a snapshot replicated again
  sends nothing. A pull request reaches the peer's ``on_pull`` with the sending site's
  certificate name (202 with the job ids, 409 when it refuses, 404 without a handler).

Implementations (``peers.PEERS``): the receiver over a ``Store`` with and without the data
key, and ``tests.memory_peer.MemoryPeer``. None is a mock: each is served by ``PeerServer``
on loopback with the sites' certificates.
"""

import os
import random
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import msgspec
import pytest

from engine.core.errors import ConfigError, EngineError
from engine.core.ids import ZERO_ID, short
from engine.jobs.states import State
from engine.replication import protocol as proto
from engine.replication.job import run_replication
from engine.replication.sender import Sender, request_pull
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.keys import StoreKeys
from engine.store.manifest import Manifest
from engine.util.retry import RetryPolicy
from tests.conftest import CHEAP_KDF, PASSPHRASE, StoreFactory
from tests.contract.peers import PEERS, PeerHarness
from tests.helpers import realistic_bytes, write_snapshot
from tests.unit.replication.support import Pki, make_pki

CHUNK: Final = fmt.MIN_CHUNK_SIZE
BATCH: Final = CHUNK  # record batches of one to a few records: a snapshot takes several
FAST_RETRY: Final = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
ONE_TRY: Final = RetryPolicy(attempts=1)  # what a refusal must not need: a second try


@dataclass
class Pulls:
    """The ``on_pull`` the peers are served with: records each call, answers ``jobs`` or
    raises ``error``."""

    jobs: list[str] = field(default_factory=lambda: ["job-1", "job-2"])
    error: EngineError | None = None
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def __call__(self, peer: str, vms: tuple[str, ...]) -> list[str]:
        self.calls.append((peer, vms))
        if self.error is not None:
            raise self.error
        return self.jobs


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def origin(make_store: StoreFactory) -> Store:
    return make_store("origin", chunk_size=CHUNK)


@pytest.fixture
def pulls() -> Pulls:
    return Pulls()


@pytest.fixture(params=list(PEERS))
async def peer(
    request: pytest.FixtureRequest, tmp_path: Path, origin: Store, pki: Pki, pulls: Pulls
) -> AsyncIterator[PeerHarness]:
    async with PEERS[request.param](tmp_path, origin, pki, pulls) as harness:
        yield harness


# --- what the origin sends -------------------------------------------------------------------


def disks(seed: int) -> dict[str, bytes]:
    os_disk = (
        realistic_bytes(6 * CHUNK, seed) + bytes(2 * CHUNK) + random.Random(seed).randbytes(4608)
    )
    return {"os": os_disk, "data": realistic_bytes(3 * CHUNK, seed + 1)}


def snapshot(origin: Store, seed: int = 1) -> Manifest:
    return write_snapshot(origin, "web", disks(seed), config=b'{"name": "web"}')


def chunk_ids(origin: Store, manifest: Manifest) -> list[bytes]:
    """The distinct chunks a snapshot names, its configuration's first."""
    ids: dict[bytes, None] = {}
    if manifest.config is not None:
        ids[bytes.fromhex(manifest.config.chunk_id)] = None
    for disk in manifest.disks:
        with origin.open_diskmap(manifest, disk) as dm:
            ids |= {cid: None for _, cid in dm.iter_ids() if cid != ZERO_ID}
    return list(ids)


def record(origin: Store, cid: bytes) -> bytes:
    return origin.get_record(cid)[0]


def files(origin: Store, manifest: Manifest) -> dict[str, bytes]:
    """The snapshot's files as the origin holds them (what a commit must publish)."""
    directory = origin.layout.snapshot_dir(manifest.snapshot_id)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def sender(origin: Store, peer: PeerHarness, policy: RetryPolicy = FAST_RETRY) -> Sender:
    return Sender(origin, peer.target(), retry_policy=policy, batch_bytes=BATCH)


def store_with(tmp_path: Path, name: str, keys: StoreKeys, chunk_size: int = CHUNK) -> Store:
    Store.init(
        tmp_path / name,
        chunk_size=chunk_size,
        encryption="aes-256-gcm" if keys.data_key else "none",
        passphrase=PASSPHRASE,
        kdf=CHEAP_KDF,
        keys=keys,
    )
    return Store.open(tmp_path / name, passphrase=PASSPHRASE)


# --- requests a sender never sends -----------------------------------------------------------


def offer(origin: Store, manifest: Manifest, **changes: object) -> bytes:
    """The session offer a sender of ``origin`` makes for ``manifest``, with ``changes``."""
    made = proto.OpenSession(
        protocol=proto.PROTOCOL_VERSION,
        sender="contract",
        snapshot_id=manifest.snapshot_id,
        vm_id=manifest.vm_id,
        vm_name=manifest.vm_name,
        chunk_size=origin.config.chunk_size,
        keys=proto.key_fingerprint(origin.keys),
        data_key=proto.data_key_fingerprint(origin.keys),
    )
    return msgspec.json.encode(msgspec.structs.replace(made, **changes))


@dataclass
class Wire:
    """Plain requests to the peer, with the sending site's certificate."""

    http: aiohttp.ClientSession
    base: str

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        async with self.http.request(method, self.base + path, data=body) as response:
            return response.status, await response.read()

    async def open(self, origin: Store, manifest: Manifest) -> str:
        status, body = await self.call("POST", "/sessions", offer(origin, manifest))
        assert status == 200, body
        return msgspec.json.decode(body, type=proto.SessionOpened).session

    async def lacking(self, session: str, ids: list[bytes]) -> set[bytes]:
        status, body = await self.call("POST", f"/sessions/{session}/lacking", b"".join(ids))
        assert status == 200, body
        return set(proto.split_ids(body))

    async def records(self, session: str, records: list[bytes]) -> tuple[int, bytes]:
        return await self.call("POST", f"/sessions/{session}/records", b"".join(records))

    async def stage(self, session: str, origin: Store, manifest: Manifest) -> None:
        for name, data in files(origin, manifest).items():
            if name != "manifest":
                status, body = await self.diskmap(session, name, data)
                assert status == 200, body

    async def diskmap(self, session: str, name: str, data: bytes) -> tuple[int, bytes]:
        return await self.call("PUT", f"/sessions/{session}/diskmaps/{name}", data)

    async def commit(self, session: str, raw: bytes) -> tuple[int, bytes]:
        return await self.call("POST", f"/sessions/{session}/commit", raw)


@pytest.fixture
async def wire(peer: PeerHarness, pki: Pki) -> AsyncIterator[Wire]:
    connector = aiohttp.TCPConnector(ssl=pki.client_context())
    async with aiohttp.ClientSession(connector=connector) as http:
        yield Wire(http, peer.target().url + proto.PREFIX)


def refusal(body: bytes) -> proto.Refusal:
    return msgspec.json.decode(body, type=proto.Refusal)


def with_crc(data: bytearray) -> bytes:
    """``data`` with its CRC made right again (a damage only a decoder can find)."""
    end = len(data) - fmt.RECORD_CRC.size
    fmt.RECORD_CRC.pack_into(data, end, zlib.crc32(data[:end]))
    return bytes(data)


# --- sessions --------------------------------------------------------------------------------


async def test_a_new_snapshot_gets_a_session_and_nothing_is_visible(
    peer: PeerHarness, origin: Store
) -> None:
    m = snapshot(origin)
    async with sender(origin, peer) as s:
        opened = await s.open(m, base=None)
        assert not opened.committed
        assert opened.session
        assert s.session_id == opened.session
        assert not opened.base_held
        assert opened.encrypted_only == peer.encrypted_only
        assert peer.committed() == set()
        assert peer.leftovers() != [], "the session is open"
        await s.abort()
    assert peer.leftovers() == []


@pytest.mark.parametrize(
    "wrong", ["keys", "data key", "chunk size", "protocol", "snapshot id", "offer"]
)
async def test_an_offer_it_cannot_take_is_refused_before_any_session(
    peer: PeerHarness, origin: Store, wire: Wire, tmp_path: Path, wrong: str
) -> None:
    m = snapshot(origin)
    keys = origin.keys
    if wrong in ("keys", "data key", "chunk size"):
        other = {
            # No data key: only the id and MAC keys' fingerprint can tell it apart.
            "keys": StoreKeys.generate(encrypted=False),
            "data key": StoreKeys(keys.id_key, keys.mac_key, os.urandom(32)),
            "chunk size": keys,
        }[wrong]
        chunk_size = 2 * CHUNK if wrong == "chunk size" else CHUNK
        stranger = store_with(tmp_path, "stranger", other, chunk_size)
        try:
            async with Sender(stranger, peer.target(), retry_policy=ONE_TRY) as s:
                if wrong == "data key" and peer.encrypted_only:
                    # It holds no data key to compare: records stay encrypted as they are.
                    assert not (await s.open(m, None)).committed
                    await s.abort()
                    return
                status = {"keys": 403, "data key": 403, "chunk size": 409}[wrong]
                with pytest.raises(proto.PeerError, match=f"HTTP {status}") as caught:
                    await s.open(m, None)
                assert not isinstance(caught.value, proto.TransientPeerError)
        finally:
            stranger.close()
    else:
        body_of = {
            "protocol": offer(origin, m, protocol=proto.PROTOCOL_VERSION + 1),
            "snapshot id": offer(origin, m, snapshot_id="../../etc"),
            "offer": b'{"protocol": 1, "snapshot": "no such field"}',
        }
        status, body = await wire.call("POST", "/sessions", body_of[wrong])
        assert status == {"protocol": 409, "snapshot id": 400, "offer": 400}[wrong], body
        assert refusal(body).error
    assert peer.leftovers() == []
    assert peer.committed() == set()


async def test_a_new_session_for_a_snapshot_replaces_the_old_one(
    peer: PeerHarness, origin: Store
) -> None:
    m = snapshot(origin)
    ids = chunk_ids(origin, m)
    async with sender(origin, peer) as old, sender(origin, peer) as new:
        await old.open(m, None)
        await new.open(m, None)
        with pytest.raises(proto.SessionLost):
            await old.lacking(ids)
        assert set(await new.lacking(ids)) == set(ids)
        await new.abort()
    assert peer.leftovers() == []


async def test_an_unknown_session_is_lost_on_every_route(
    peer: PeerHarness, origin: Store, wire: Wire
) -> None:
    m = snapshot(origin)
    cid = chunk_ids(origin, m)[0]
    unknown = "0" * 24
    async with sender(origin, peer, ONE_TRY) as s:
        s.session_id = unknown
        with pytest.raises(proto.SessionLost):
            await s.lacking([cid])
        with pytest.raises(proto.SessionLost):
            await s.commit(m)
        await s.abort()  # a session it does not know: nothing to do, no error
    for method, path, body in (
        ("POST", "records", record(origin, cid)),
        ("PUT", "diskmaps/disk-0.dmap", files(origin, m)["disk-0.dmap"]),
        ("POST", "commit", files(origin, m)["manifest"]),
    ):
        status, answer = await wire.call(method, f"/sessions/{unknown}/{path}", body)
        assert status == 404, (path, answer)
    assert peer.committed() == set()


# --- lacking and records ---------------------------------------------------------------------


async def test_lacking_is_what_the_peer_does_not_hold_and_a_batch_is_held_when_answered(
    peer: PeerHarness, origin: Store, wire: Wire
) -> None:
    m = snapshot(origin)
    ids = chunk_ids(origin, m)
    strangers = [os.urandom(32) for _ in range(3)]
    session = await wire.open(origin, m)
    assert await wire.lacking(session, ids + strangers) == set(ids + strangers)
    half = ids[: len(ids) // 2]
    records = [record(origin, cid) for cid in half]
    status, body = await wire.records(session, records)
    assert status == 200, body
    sizes = sum(len(r) for r in records)
    result = msgspec.json.decode(body, type=proto.BatchResult)
    assert result == proto.BatchResult(len(half), len(half), 0, sizes)
    assert await wire.lacking(session, ids + strangers) == set(ids[len(half) :] + strangers)
    for cid, held in zip(half, records, strict=True):
        assert peer.record(cid) == held
    # The same batch again (a retry whose answer was lost): nothing new.
    status, body = await wire.records(session, records)
    assert status == 200, body
    again = msgspec.json.decode(body, type=proto.BatchResult)
    assert again == proto.BatchResult(len(half), 0, len(half), sizes)


async def test_id_lists_are_bounded_and_whole(peer: PeerHarness, origin: Store, wire: Wire) -> None:
    m = snapshot(origin)
    session = await wire.open(origin, m)
    full = [os.urandom(32) for _ in range(proto.OFFER_BATCH)]
    assert await wire.lacking(session, full) == set(full)
    status, _ = await wire.call("POST", f"/sessions/{session}/lacking", b"".join(full) + full[0])
    assert status == 413
    status, body = await wire.call("POST", f"/sessions/{session}/lacking", b"x" * 33)
    assert status == 400, body


@pytest.mark.parametrize("damage", ["crc", "magic", "truncated", "crc-then-truncated", "content"])
async def test_a_damaged_record_ends_its_batch_and_is_not_held(
    peer: PeerHarness, origin: Store, wire: Wire, damage: str
) -> None:
    m = snapshot(origin)
    ids = chunk_ids(origin, m)[:4]
    batch = [bytearray(record(origin, cid)) for cid in ids]
    bad = batch[2]
    if damage == "crc":
        bad[fmt.RECORD_HEADER.size + 20] ^= 0x01
    elif damage == "crc-then-truncated":  # the first damaged record is the one named
        bad[fmt.RECORD_HEADER.size + 20] ^= 0x01
        del batch[3][-10:]
    elif damage == "magic":
        bad[0:4] = b"XXXX"
    elif damage == "truncated":
        del batch[3]
        del bad[-10:]
    else:  # a byte of the payload changed and the CRC made right: only decoding finds it
        bad[fmt.RECORD_HEADER.size + 20] ^= 0x01
        batch[2] = bytearray(with_crc(bad))
    session = await wire.open(origin, m)
    status, body = await wire.records(session, [bytes(r) for r in batch])
    if damage == "content" and peer.encrypted_only:
        assert status == 200, body  # what a peer without the key cannot see, it holds
        return
    assert status == 422, body
    refused = refusal(body)
    assert refused.chunk == short(ids[2])
    assert refused.durable == 2
    lacking = await wire.lacking(session, ids)
    assert ids[2] in lacking
    assert not lacking & set(ids[:2]), "the records before the damaged one are held"
    assert peer.record(ids[2]) is None
    # The sender resends what is lacking: the batch goes through.
    resend = [record(origin, cid) for cid in ids if cid in lacking]
    status, body = await wire.records(session, resend)
    assert status == 200, body
    assert await wire.lacking(session, ids) == set()


# --- commit ----------------------------------------------------------------------------------


async def test_a_commit_publishes_the_snapshot_byte_for_byte(
    peer: PeerHarness, origin: Store
) -> None:
    m = snapshot(origin)
    async with sender(origin, peer) as s:
        await s.open(m, None)
        await s.transfer(m, None)
        assert peer.committed() == set(), "records are not a snapshot"
        committed = await s.commit(m)
        assert committed == proto.Committed(m.snapshot_id, len(m.disks))
        assert s.session_id is None
    assert peer.committed() == {m.snapshot_id}
    assert peer.files(m.snapshot_id) == files(origin, m)
    for cid in chunk_ids(origin, m):
        assert peer.record(cid) == record(origin, cid)
    assert peer.leftovers() == []

    m2 = write_snapshot(origin, "web", disks(seed=5))
    async with sender(origin, peer) as s:
        again = await s.open(m, None)
        assert (again.committed, s.session_id) == (True, None)
        assert (await s.open(m2, base=m.snapshot_id)).base_held
        assert not (await s.open(m2, base="0123456789abcdef")).base_held
        await s.abort()
    assert peer.leftovers() == []


async def test_staged_diskmaps_are_not_a_snapshot_and_an_abort_drops_them(
    peer: PeerHarness, origin: Store, wire: Wire
) -> None:
    m = snapshot(origin)
    ids = chunk_ids(origin, m)
    session = await wire.open(origin, m)
    status, _ = await wire.records(session, [record(origin, cid) for cid in ids])
    assert status == 200
    await wire.stage(session, origin, m)
    assert peer.committed() == set()
    status, _ = await wire.call("DELETE", f"/sessions/{session}")
    assert status == 200
    assert peer.leftovers() == []
    assert peer.committed() == set()
    assert all(peer.record(cid) == record(origin, cid) for cid in ids), "records stay"
    # A new session finds them held and commits with the DiskMaps sent again.
    session = await wire.open(origin, m)
    assert await wire.lacking(session, ids) == set()
    await wire.stage(session, origin, m)
    status, body = await wire.commit(session, files(origin, m)["manifest"])
    assert status == 200, body
    assert peer.committed() == {m.snapshot_id}


def flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    "wrong",
    [
        "chunk missing",
        "manifest tampered",
        "another snapshot's manifest",
        "DiskMap damaged",
        "another snapshot's DiskMap",
        "DiskMap not sent",
        "DiskMap badly named",
    ],
)
async def test_a_commit_it_cannot_take_is_refused_and_the_session_stays(
    peer: PeerHarness, origin: Store, wire: Wire, wrong: str
) -> None:
    m = snapshot(origin)
    other = snapshot(origin, seed=9)
    ids = chunk_ids(origin, m)
    session = await wire.open(origin, m)
    held = ids[1:] if wrong == "chunk missing" else ids
    status, _ = await wire.records(session, [record(origin, cid) for cid in held])
    assert status == 200
    mine = files(origin, m)
    raw = mine["manifest"]
    if wrong != "DiskMap not sent":
        await wire.stage(session, origin, m)
    if wrong == "manifest tampered":
        raw = flipped(raw, len(raw) - 2)
    elif wrong == "another snapshot's manifest":
        raw = files(origin, other)["manifest"]
    elif wrong in ("DiskMap damaged", "another snapshot's DiskMap"):
        dmap = mine["disk-0.dmap"]
        wrong_map = (
            flipped(dmap, fmt.DISKMAP_HEADER_SIZE + 5)
            if wrong == "DiskMap damaged"
            else files(origin, other)["disk-0.dmap"]  # well formed, not this manifest's
        )
        status, body = await wire.diskmap(session, "disk-0.dmap", wrong_map)
        assert status == 200, body
    elif wrong == "DiskMap badly named":
        status, body = await wire.diskmap(session, "disk-0.map", mine["disk-0.dmap"])
        assert 400 <= status < 500, (status, body)
        assert peer.committed() == set()
        status, body = await wire.diskmap(session, "..dmap", mine["disk-0.dmap"])
        assert 400 <= status < 500, (status, body)
    if wrong != "DiskMap badly named":
        status, body = await wire.commit(session, raw)
        expected = {
            "chunk missing": 409,
            "manifest tampered": 403,
            "another snapshot's manifest": 403,
            "DiskMap damaged": 422,
            "another snapshot's DiskMap": 422,
            "DiskMap not sent": 409,
        }[wrong]
        assert status == expected, (status, body)
        error = refusal(body).error
        if wrong == "chunk missing":
            assert "missing chunks" in error  # what the replicate job looks for
            assert short(ids[0]) in error
    assert peer.committed() == set()
    # The session is as it was: what was wrong sent right, the commit goes through.
    status, _ = await wire.records(session, [record(origin, ids[0])])
    assert status == 200
    await wire.stage(session, origin, m)
    status, body = await wire.commit(session, mine["manifest"])
    assert status == 200, body
    assert peer.files(m.snapshot_id) == mine
    assert peer.leftovers() == []


async def test_after_a_commit_the_session_is_over(
    peer: PeerHarness, origin: Store, wire: Wire
) -> None:
    m = snapshot(origin)
    session = await wire.open(origin, m)
    status, _ = await wire.records(session, [record(origin, c) for c in chunk_ids(origin, m)])
    assert status == 200
    await wire.stage(session, origin, m)
    raw = files(origin, m)["manifest"]
    status, body = await wire.commit(session, raw)
    assert status == 200, body
    assert msgspec.json.decode(body, type=proto.Committed).snapshot_id == m.snapshot_id
    status, _ = await wire.commit(session, raw)
    assert status == 404
    status, _ = await wire.call("DELETE", f"/sessions/{session}")
    assert status == 200
    assert peer.committed() == {m.snapshot_id}, "an abort never takes a committed snapshot"
    assert peer.files(m.snapshot_id) == files(origin, m)
    assert peer.leftovers() == []


# --- the replicate job and pulls -------------------------------------------------------------


async def test_a_lost_session_is_resumed_without_sending_twice(
    peer: PeerHarness, origin: Store
) -> None:
    m = snapshot(origin)
    ids = chunk_ids(origin, m)
    arrived: list[int] = []

    def restart_after_the_first_batch(_stats: object) -> None:
        if not arrived:
            arrived.append(sum(peer.record(cid) is not None for cid in ids))
            peer.lose_sessions()

    out = await run_replication(
        store=origin,
        snapshot_id=m.snapshot_id,
        target=peer.target(streams=1),
        progress=restart_after_the_first_batch,
        retry_policy=FAST_RETRY,
        batch_bytes=BATCH,
    )
    assert out.record.state is State.SUCCEEDED, out.record.error
    assert any("session lost" in w for w in out.record.warnings)
    assert 0 < arrived[0] < len(ids)
    # The new session's offer found what had arrived: it was not sent again.
    assert out.stats.chunks_skipped >= arrived[0]
    assert out.stats.chunks_sent <= len(ids) + BATCH // min(len(record(origin, c)) for c in ids) + 1
    assert peer.files(m.snapshot_id) == files(origin, m)
    assert peer.leftovers() == []

    again = await run_replication(store=origin, snapshot_id=m.snapshot_id, target=peer.target())
    assert again.record.state is State.SUCCEEDED, again.record.error
    assert again.already_there
    assert again.stats.chunks_sent == 0


async def test_an_incremental_replication_sends_only_what_changed(
    peer: PeerHarness, origin: Store
) -> None:
    first = snapshot(origin)
    out = await run_replication(store=origin, snapshot_id=first.snapshot_id, target=peer.target())
    assert out.record.state is State.SUCCEEDED, out.record.error
    data = disks(seed=1)
    changed = bytearray(data["os"])
    changed[CHUNK : 2 * CHUNK] = os.urandom(CHUNK)
    data["os"] = bytes(changed)
    second = write_snapshot(origin, "web", data, config=b'{"name": "web"}')
    out = await run_replication(store=origin, snapshot_id=second.snapshot_id, target=peer.target())
    assert out.record.state is State.SUCCEEDED, out.record.error
    assert out.base == first.snapshot_id, "the peer held the base"
    assert (out.stats.offered, out.stats.chunks_sent) == (1, 1)
    assert peer.committed() == {first.snapshot_id, second.snapshot_id}
    assert peer.files(second.snapshot_id) == files(origin, second)


async def test_a_pull_request_reaches_the_peers_handler(peer: PeerHarness, pulls: Pulls) -> None:
    assert await request_pull(peer.target(), ["web*", "db"]) == pulls.jobs
    assert pulls.calls == [("site-a", ("web*", "db"))]
    pulls.error = ConfigError(message="no VM named db here")
    with pytest.raises(proto.PeerError, match=r"HTTP 409.*no VM named db here"):
        await request_pull(peer.target(), ["db"])


@pytest.mark.parametrize("name", list(PEERS))
async def test_a_peer_without_a_pull_handler_refuses_pulls(
    request: pytest.FixtureRequest, tmp_path: Path, origin: Store, pki: Pki, name: str
) -> None:
    async with PEERS[name](tmp_path, origin, pki, None) as peer:
        with pytest.raises(proto.PeerError, match="HTTP 404"):
            await request_pull(peer.target(), ["web"])
