"""Two stores on loopback with mutual TLS: full and incremental pushes, wire bytes, a
client without a valid certificate, a stream cut mid-batch (resume sends only the rest)
and a byte flipped in transit (detected, the batch resent, nothing bad committed).

Wire bound (TCP bytes both ways, counted by a proxy, TLS included)::

    wire ≤ 1.05 × record bytes the receiver lacked + 1 KiB × requests + 8 KiB × connections

(1 KiB: HTTP request and response headers and small JSON bodies; 8 KiB: a TLS handshake
with both certificates; the 64 bytes per offered id are inside the 5 %.)
"""

import asyncio
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from engine.jobs.states import State
from engine.maint.check import check_store
from engine.replication import protocol as proto
from engine.replication import tls
from engine.replication.job import default_journal, run_replication
from engine.replication.receiver import RECEIVER, Handler, PeerServer, build_peer_app
from engine.replication.sender import Sender
from engine.replication.state import PeerState
from engine.store.chunk_store import Store
from engine.store.layout import RemoteConfig
from engine.store.manifest import Manifest
from engine.util import failpoints
from engine.util.retry import RetryPolicy
from tests.conftest import CHEAP_KDF, PASSPHRASE, StoreFactory
from tests.helpers import read_disk, realistic_bytes, write_snapshot
from tests.s3.rgw import BucketFactory
from tests.unit.replication.support import Pki, Proxy, init_replica, make_pki, receiver, target

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
BATCH = 256 * 1024  # small record batches so a few MiB make many requests and streams
# A VM configuration larger than a chunk (set_config allows up to 8 MiB).
CONFIG = b'{"name": "vm1", "ovf": "' + realistic_bytes(100 * 1024, seed=8).hex().encode() + b'"}'
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


def disk_v1() -> bytes:
    return realistic_bytes(40 * CHUNK, seed=5) + bytes(4 * CHUNK) + realistic_bytes(CHUNK, 6)


def changed(data: bytes, slots: list[int], seed: int) -> bytes:
    buf = bytearray(data)
    for n, slot in enumerate(slots):
        buf[slot * CHUNK : (slot + 1) * CHUNK] = realistic_bytes(CHUNK, seed + n)
    return bytes(buf)


def wire_bound(lacked_bytes: int, requests: int, connections: int) -> float:
    return 1.05 * lacked_bytes + 1024 * requests + 8192 * connections


def record_bytes(store: Store, manifest: Manifest) -> tuple[int, int]:
    """(distinct non-zero chunks, their record bytes) of a snapshot, config included."""
    ids = {bytes.fromhex(manifest.config.chunk_id)} if manifest.config else set()
    for disk in manifest.disks:
        with store.open_diskmap(manifest, disk) as dm:
            ids |= {cid for _, cid in dm.iter_ids() if any(cid)}
    total = 0
    for cid in ids:
        loc = store.index.lookup(cid)
        assert loc is not None
        total += loc.length
    return len(ids), total


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def pair(make_store: StoreFactory, tmp_path: Path) -> tuple[Store, Store]:
    sender = make_store("site-a", chunk_size=CHUNK)
    replica = init_replica(tmp_path / "site-b", sender)
    yield sender, replica
    replica.close()


@pytest.fixture
def bucket_pair(tmp_path: Path, s3_buckets: BucketFactory) -> Iterator[tuple[Store, Store]]:
    """A sender whose packs live in one bucket, a replica whose packs live in another."""
    a, b = s3_buckets(), s3_buckets()
    path = tmp_path / "site-a"
    Store.init(
        path,
        chunk_size=CHUNK,
        pack_size=1024 * 1024,
        passphrase=PASSPHRASE,
        kdf=CHEAP_KDF,
        remote=RemoteConfig(a.url, a.bucket, "origin/", cache_bytes=2 * 1024 * 1024),
        s3_key=(a.access_key, a.secret_key),
    )
    sender = Store.open(path, passphrase=PASSPHRASE)
    replica = init_replica(tmp_path / "site-b", sender, pack_size=1024 * 1024, bucket=b)
    yield sender, replica
    replica.close()
    sender.close()


async def test_full_then_incremental(pair: tuple[Store, Store], pki: Pki) -> None:
    await full_then_incremental(*pair, pki)


async def test_full_then_incremental_between_buckets(
    bucket_pair: tuple[Store, Store], pki: Pki
) -> None:
    """The same between two stores whose packs live in buckets of a real RGW: the sender
    reads records through its cache, the receiver uploads the packs it seals."""
    sender, replica = bucket_pair
    await full_then_incremental(sender, replica, pki)
    assert replica.remote is not None
    in_bucket = {p.name for p in replica.remote.objects.list()}
    assert in_bucket == {p.name for p in replica.index.packs()}


async def full_then_incremental(sender: Store, replica: Store, pki: Pki) -> None:
    v1 = {"root": disk_v1(), "data": realistic_bytes(8 * CHUNK + 4096, seed=9)}
    m1 = write_snapshot(sender, "vm1", v1, config=CONFIG)
    chunks, missing_bytes = record_bytes(sender, m1)
    async with receiver(replica, pki) as (server, recv), Proxy(server.port) as proxy:
        full = await run_replication(
            store=sender,
            snapshot_id=m1.snapshot_id,
            target=target(pki, proxy.listen_port),
            batch_bytes=BATCH,
        )
        assert full.record.state is State.SUCCEEDED, full.record.error
        s = full.stats
        assert (s.offered, s.lacked, s.chunks_sent, s.chunks_skipped) == (chunks, chunks, chunks, 0)
        assert s.lacked_bytes == s.record_bytes_sent == missing_bytes
        assert proxy.total <= wire_bound(missing_bytes, s.requests, proxy.connections), (
            proxy.total,
            missing_bytes,
            s.requests,
        )
        assert recv.stats.stored == chunks
        for i, data in enumerate(v1.values()):
            assert read_disk(replica, replica.manifest(m1.snapshot_id), i) == data
        assert PeerState.load(sender.path, "site-b").last("vm1") == m1.snapshot_id

        # Incremental: 3 slots changed; one changed back to a chunk the receiver holds.
        v2 = dict(v1)
        v2["root"] = changed(v1["root"], [3, 17, 30], seed=100)
        v2["data"] = v1["root"][:CHUNK] + v1["data"][CHUNK:]
        m2 = write_snapshot(sender, "vm1", v2, config=CONFIG)
        before = proxy.total
        incr = await run_replication(
            store=sender,
            snapshot_id=m2.snapshot_id,
            target=target(pki, proxy.listen_port),
            batch_bytes=BATCH,
        )
        assert incr.record.state is State.SUCCEEDED, incr.record.error
        assert incr.base == m1.snapshot_id
        s = incr.stats
        assert (s.offered, s.lacked, s.chunks_sent, s.chunks_skipped) == (4, 3, 3, 1)
        wire = proxy.total - before
        assert wire <= wire_bound(s.lacked_bytes, s.requests, proxy.connections)
        for i, data in enumerate(v2.values()):
            assert read_disk(replica, replica.manifest(m2.snapshot_id), i) == data

        # Again: the receiver holds it already; nothing is sent.
        again = await run_replication(
            store=sender, snapshot_id=m2.snapshot_id, target=target(pki, proxy.listen_port)
        )
        assert again.already_there
        assert again.stats.chunks_sent == 0
    result = check_store(replica, data=True)
    assert result.ok, result.findings
    assert result.snapshots == 2


async def test_client_without_valid_certificate_is_refused(
    pair: tuple[Store, Store], pki: Pki, tmp_path: Path
) -> None:
    _, replica = pair
    other_ca = tmp_path / "other-ca"
    tls.init_ca(other_ca)
    stranger = tls.issue(other_ca, "site-a", tmp_path / "stranger", ips=["127.0.0.1"])
    no_cert = ssl.create_default_context(cafile=str(pki.receiver.ca))
    wrong_ca = ssl.create_default_context(cafile=str(pki.receiver.ca))
    wrong_ca.load_cert_chain(stranger.cert, stranger.key)
    async with receiver(replica, pki) as (server, recv):
        url = f"https://127.0.0.1:{server.port}{proto.PREFIX}/sessions"
        for context in (no_cert, wrong_ca):
            async with aiohttp.ClientSession() as http:
                with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                    async with http.post(url, data=b"{}", ssl=context) as response:
                        await response.read()
        # A valid client reaches HTTP (and is refused there for its empty body).
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=b"{}", ssl=pki.client_context()) as response:
                assert response.status == 400
        assert recv.stats.sessions == 0


async def test_cut_stream_resumes_with_only_the_rest(pair: tuple[Store, Store], pki: Pki) -> None:
    sender, replica = pair
    data = realistic_bytes(64 * CHUNK, seed=21)
    m = write_snapshot(sender, "vm2", {"root": data})
    chunks, missing_bytes = record_bytes(sender, m)
    async with receiver(replica, pki) as (server, _recv):
        # A session that gives up at the first cut (no retries): the job fails.
        async with Proxy(server.port, cut_after=missing_bytes // 2) as proxy:
            first = await run_replication(
                store=sender,
                snapshot_id=m.snapshot_id,
                target=target(pki, proxy.listen_port),
                batch_bytes=BATCH,
                retry_policy=RetryPolicy(attempts=1),
            )
            assert proxy.cuts == 1
        assert first.record.state is State.FAILED
        ids = {cid for _, cid in _ids(sender, m)}
        arrived = sum(1 for cid in ids if replica.index.lookup(cid) is not None)
        assert 0 < arrived < chunks
        # A new session (a restart) sends exactly the rest.
        second = await run_replication(
            store=sender, snapshot_id=m.snapshot_id, target=target(pki, server.port)
        )
        assert second.record.state is State.SUCCEEDED, second.record.error
        # The receiver may still have been committing the batch the cut interrupted when the
        # chunks were counted: what the second session found there is at least that many.
        skipped = second.stats.chunks_skipped
        assert arrived <= skipped < chunks
        assert second.stats.lacked == second.stats.chunks_sent == chunks - skipped

        # Within one session: the cut batch is retried; only what did not arrive is resent.
        m3 = write_snapshot(sender, "vm3", {"root": realistic_bytes(64 * CHUNK, seed=77)})
        chunks3, missing3 = record_bytes(sender, m3)
        async with Proxy(server.port, cut_after=missing3 // 2) as proxy:
            third = await run_replication(
                store=sender,
                snapshot_id=m3.snapshot_id,
                target=target(pki, proxy.listen_port),
                batch_bytes=BATCH,
                retry_policy=FAST_RETRY,
            )
            assert proxy.cuts == 1
        assert third.record.state is State.SUCCEEDED, third.record.error
        assert third.stats.retries >= 1
        per_batch = BATCH // min(loc.length for loc in _locations(sender, m3)) + 1
        assert chunks3 <= third.stats.chunks_sent <= chunks3 + 3 * per_batch
        assert read_disk(replica, replica.manifest(m3.snapshot_id)) == read_disk(sender, m3)
    result = check_store(replica, data=True)
    assert result.ok, result.findings


async def test_corrupt_record_in_transit_is_resent(pair: tuple[Store, Store], pki: Pki) -> None:
    sender, replica = pair
    data = realistic_bytes(24 * CHUNK, seed=31)
    m = write_snapshot(sender, "vm4", {"root": data})
    chunks, _ = record_bytes(sender, m)
    # The proxy terminates TLS (as the receiver, with its certificate) and opens its own
    # mutual-TLS connection to the receiver (as the sender), so it can flip a record byte.
    terminate = (pki.server_context(), pki.client_context())
    async with receiver(replica, pki) as (server, recv):
        async with Proxy(server.port, tls_pair=terminate, corrupt=True) as proxy:
            out = await run_replication(
                store=sender,
                snapshot_id=m.snapshot_id,
                target=target(pki, proxy.listen_port),
                batch_bytes=BATCH,
                retry_policy=FAST_RETRY,
            )
            assert proxy.flips == 1
    assert out.record.state is State.SUCCEEDED, out.record.error
    assert recv.stats.refused_batches == 1
    assert out.stats.retries == 1
    assert any("CRC32 mismatch" in e for e in out.stats.errors)
    assert recv.stats.stored == chunks
    assert read_disk(replica, replica.manifest(m.snapshot_id)) == data
    result = check_store(replica, data=True)
    assert result.ok, result.findings


def _ids(store: Store, manifest: Manifest) -> list[tuple[int, bytes]]:
    out = []
    for disk in manifest.disks:
        with store.open_diskmap(manifest, disk) as dm:
            out += [(slot, cid) for slot, cid in dm.iter_ids() if any(cid)]
    return out


def _locations(store: Store, manifest: Manifest) -> list:  # type: ignore[type-arg]
    return [store.index.lookup(cid) for _, cid in _ids(store, manifest)]


async def test_encrypted_only_receiver_stores_and_serves_back(
    make_store: StoreFactory, tmp_path: Path, pki: Pki
) -> None:
    """A site without the data key checks CRCs, stores the records as they are, and can
    push them on to a keyed site, where they restore exactly."""
    origin = make_store("origin", chunk_size=CHUNK)
    vault = init_replica(tmp_path / "vault", origin, encrypted_only=True)
    restored = init_replica(tmp_path / "restored", origin)
    try:
        assert vault.keys.data_key is None
        data = realistic_bytes(12 * CHUNK, seed=41)
        m = write_snapshot(origin, "vm5", {"root": data}, config=b"ovf")
        async with receiver(vault, pki) as (server, _):
            out = await run_replication(
                store=origin, snapshot_id=m.snapshot_id, target=target(pki, server.port)
            )
        assert out.record.state is State.SUCCEEDED, out.record.error
        for _, cid in _ids(origin, m):
            assert vault.get_record(cid)[0] == origin.get_record(cid)[0]
        async with receiver(restored, pki) as (server, _):
            back = await run_replication(
                store=vault, snapshot_id=m.snapshot_id, target=target(pki, server.port)
            )
        assert back.record.state is State.SUCCEEDED, back.record.error
        assert read_disk(restored, restored.manifest(m.snapshot_id)) == data
        assert check_store(restored, data=True).ok
    finally:
        vault.close()
        restored.close()


async def test_receiver_without_the_base_gets_every_id(
    pair: tuple[Store, Store], pki: Pki, tmp_path: Path
) -> None:
    """The per-peer state says m1 went to site-b, but site-b is a fresh store now (rebuilt,
    or pruned there): the session learns the base is not held and offers every id."""
    sender, replica = pair
    data = realistic_bytes(10 * CHUNK, seed=51)
    m1 = write_snapshot(sender, "vm6", {"root": data})
    async with receiver(replica, pki) as (server, _):
        first = await run_replication(
            store=sender, snapshot_id=m1.snapshot_id, target=target(pki, server.port)
        )
    assert first.record.state is State.SUCCEEDED
    m2 = write_snapshot(sender, "vm6", {"root": changed(data, [2], seed=52)})
    fresh = init_replica(tmp_path / "fresh", sender)
    try:
        async with receiver(fresh, pki) as (server, _):
            out = await run_replication(
                store=sender, snapshot_id=m2.snapshot_id, target=target(pki, server.port)
            )
        assert out.record.state is State.SUCCEEDED, out.record.error
        assert out.base is None
        assert out.stats.lacked == 10
        assert read_disk(fresh, fresh.manifest(m2.snapshot_id)) == read_disk(sender, m2)
    finally:
        fresh.close()


async def test_cancelled_job_aborts_the_receiver_session(
    pair: tuple[Store, Store], pki: Pki
) -> None:
    sender, replica = pair
    m = write_snapshot(sender, "vm7", {"root": realistic_bytes(32 * CHUNK, seed=61)})
    async with receiver(replica, pki) as (server, recv):
        batch_done = asyncio.Event()
        job = asyncio.create_task(
            run_replication(
                store=sender,
                snapshot_id=m.snapshot_id,
                target=target(pki, server.port, streams=1),
                batch_bytes=BATCH,
                progress=lambda _stats: batch_done.set(),
            )
        )
        await batch_done.wait()
        assert recv.sessions
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert not recv.sessions  # the cleanup told the receiver
        assert not replica.layout.snapshot_dir(m.snapshot_id).exists()
        assert replica.snapshots() == []
        records = (await default_journal(sender)).records()
        assert [r.state for r in records] == [State.CANCELLED]


async def test_a_dead_senders_unfinished_record_is_marked_failed(
    make_store: StoreFactory,
) -> None:
    store = make_store("a", chunk_size=CHUNK)
    journal = await default_journal(store)
    record = await journal.create("replicate", "replication", {"snapshot": "x"})
    record.state = State.TRANSFERRING
    await journal.save(record)
    # its process lives (this one owns the record): another opening leaves it alone
    alive = (await default_journal(store)).load(record.job_id)
    assert alive.state is State.TRANSFERRING
    journal.release_owner()  # as its death would
    again = (await default_journal(store)).load(record.job_id)
    assert again.state is State.FAILED
    assert again.error is not None
    assert "interrupted" in again.error


async def test_a_record_from_before_owners_is_judged_by_its_pid(
    make_store: StoreFactory,
) -> None:
    store = make_store("a", chunk_size=CHUNK)
    journal = await default_journal(store)
    for pid in (os.getpid(), 2**22 + 7):  # a live one; above any pid_max: no such process
        record = await journal.create("replicate", "replication", {"snapshot": str(pid)})
        record.state, record.pid, record.owner = State.TRANSFERRING, pid, ""
        await journal.save(record)
    journal.release_owner()
    reopened = await default_journal(store)
    states = {r.params["snapshot"]: r.state for r in reopened.records()}
    assert states == {str(os.getpid()): State.TRANSFERRING, str(2**22 + 7): State.FAILED}


async def test_a_full_offer_batch_is_answered_and_a_larger_one_refused(
    pair: tuple[Store, Store], pki: Pki
) -> None:
    sender, replica = pair
    m = write_snapshot(sender, "vm8", {"root": realistic_bytes(2 * CHUNK, seed=71)})
    ids = [os.urandom(32) for _ in range(proto.OFFER_BATCH)]
    async with receiver(replica, pki) as (server, recv):
        async with Sender(sender, target(pki, server.port)) as session:
            await session.open(m, None)
            assert await session.lacking(ids) == ids
            with pytest.raises(proto.PeerError, match="HTTP 413"):
                await session.lacking([*ids, ids[0]])
            await session.abort()
        assert not recv.sessions


async def test_a_damaged_record_in_the_senders_pack_fails_the_job_unretried(
    pair: tuple[Store, Store], pki: Pki
) -> None:
    sender, replica = pair
    m = write_snapshot(sender, "vm9", {"root": realistic_bytes(4 * CHUNK, seed=81)})
    sender.flush()
    cid = next(cid for _, cid in _ids(sender, m))
    loc = sender.index.lookup(cid)
    assert loc is not None
    path = sender.layout.pack_files()[loc.pack]
    with path.open("r+b") as f:
        f.seek(loc.offset + 100)
        byte = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    async with receiver(replica, pki) as (server, recv):
        out = await run_replication(
            store=sender, snapshot_id=m.snapshot_id, target=target(pki, server.port)
        )
        assert not recv.sessions
    assert out.record.state is State.FAILED
    assert out.record.error is not None
    assert f"pack {loc.pack}" in out.record.error
    assert "CRC32 mismatch" in out.record.error
    assert out.stats.retries == 0
    assert replica.snapshots() == []


async def test_receiver_restart_mid_transfer_continues_in_a_new_session(
    pair: tuple[Store, Store], pki: Pki
) -> None:
    """The receiver stops after the first batch (its sessions are dropped) and comes back
    on the same port: the job opens a new session and sends only what had not arrived."""
    sender, replica = pair
    data = realistic_bytes(40 * CHUNK, seed=91)
    m = write_snapshot(sender, "vm10", {"root": data})
    chunks, _ = record_bytes(sender, m)
    first = PeerServer(build_peer_app(replica), "127.0.0.1", 0, pki.server_context())
    await first.start()
    port = first.port
    batch_done = asyncio.Event()
    job = asyncio.create_task(
        run_replication(
            store=sender,
            snapshot_id=m.snapshot_id,
            target=target(pki, port, streams=1),
            batch_bytes=BATCH,
            progress=lambda _stats: batch_done.set(),
        )
    )
    await batch_done.wait()
    await first.stop()
    arrived = sum(1 for _, cid in _ids(sender, m) if replica.index.lookup(cid) is not None)
    async with PeerServer(build_peer_app(replica), "127.0.0.1", port, pki.server_context()):
        out = await job
    assert out.record.state is State.SUCCEEDED, out.record.error
    assert any("session lost" in w for w in out.record.warnings)
    assert 0 < arrived < chunks
    # Everything arrived before the stop is never sent again; at most the batch in flight
    # at the stop (which the new session's "lacking" answer re-requests) goes twice.
    per_batch = BATCH // min(loc.length for loc in _locations(sender, m)) + 1
    assert out.stats.chunks_sent <= chunks + per_batch
    assert out.stats.chunks_sent - out.stats.chunks_skipped <= chunks + per_batch
    assert read_disk(replica, replica.manifest(m.snapshot_id)) == data


@pytest.mark.parametrize("meanwhile", ["abort", "new session"])
async def test_an_abort_or_a_new_session_during_a_commit_waits_for_it(
    pair: tuple[Store, Store], pki: Pki, meanwhile: str
) -> None:
    """The sender gives up (its cleanup aborts the session) or starts again (a new session
    for the snapshot replaces this one) while the receiver is still committing: the abort
    deletes an uncommitted snapshot's directory, so it must wait for the commit, and the
    snapshot is then either whole or absent — here whole, the commit having gone through."""
    sender, replica = pair
    data = realistic_bytes(6 * CHUNK, seed=101)
    m = write_snapshot(sender, "vm11", {"root": data})
    paused, go = threading.Event(), threading.Event()

    def pause_the_commit(name: str) -> None:
        if name == "store.manifest.before_rename":  # the receiver's commit, in its thread
            paused.set()
            go.wait(timeout=60)

    app = build_peer_app(replica)
    arrived = asyncio.Event()
    watching = False

    @web.middleware
    async def spot(request: web.Request, handler: Handler) -> web.StreamResponse:
        if watching:
            arrived.set()  # the handler runs on to its first wait before the test resumes
        return await handler(request)

    app.middlewares.append(spot)
    failpoints.install(pause_the_commit)
    try:
        async with PeerServer(app, "127.0.0.1", 0, pki.server_context()) as server:
            async with Sender(sender, target(pki, server.port)) as session:
                await session.open(m, None)
                await session.transfer(m, None)
                committing = asyncio.create_task(session.commit(m))
                await asyncio.to_thread(paused.wait, 60)
                watching = True
                async with Sender(sender, target(pki, server.port)) as other:

                    async def interfere() -> proto.SessionOpened | None:
                        if meanwhile == "new session":
                            return await other.open(m, None)
                        other.session_id = session.session_id
                        await other.abort()
                        return None

                    interfering = asyncio.create_task(interfere())
                    await arrived.wait()
                    go.set()
                    committed = await committing
                    opened = await interfering
            assert committed.snapshot_id == m.snapshot_id
            if meanwhile == "new session":
                assert opened is not None
                assert opened.committed
            assert not app[RECEIVER].sessions
            assert replica.leases.live() == []
    finally:
        failpoints.install(None)
        go.set()
    assert read_disk(replica, replica.manifest(m.snapshot_id)) == data
    result = check_store(replica, data=True)
    assert result.ok, result.findings
