"""The implementations the replication peer contract suite runs, one factory each.

``PEERS`` maps an implementation's name to an async context manager factory
``factory(tmp_path, origin, pki, on_pull)`` giving a ``PeerHarness``: a peer of ``origin``
(the sending site's ``Store``: the peer shares its keys and chunk size, as replicating sites
do) listening on loopback with the receiving site's certificate (``pki``), what a sender
needs to reach it (``target``), and what the suite checks from outside the protocol: the
records and snapshots it holds, what a session left behind. ``test_peer.py`` runs every test
with every factory.

Implementations: the real receiver (``build_peer_app`` on ``PeerServer``) over a replica
``Store`` holding the data key, and over one without it (*encrypted-only*: it checks CRCs,
cannot decode); ``tests.memory_peer.MemoryPeer`` on the same server.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Final, Protocol

from engine.replication.receiver import RECEIVER, PeerReceiver, PeerServer, build_peer_app
from engine.replication.sender import PeerTarget
from engine.store.chunk_store import Store
from engine.store.keys import StoreKeys
from tests.memory_peer import MemoryPeer, PullHandler
from tests.unit.replication.support import Pki, init_replica

PEER_NAME: Final = "site-b"  # the receiving site's certificate; the sender's is "site-a"


class PeerHarness(Protocol):
    # Holds no data key: checks records' CRCs, cannot decode them or compare the data key.
    encrypted_only: bool

    def target(self, streams: int = 2) -> PeerTarget:
        """Where a sender reaches the peer, with the sending site's client certificate."""
        ...

    def record(self, chunk_id: bytes) -> bytes | None:
        """The record the peer holds for a chunk, as it holds it; None if it holds none."""
        ...

    def committed(self) -> set[str]:
        """The snapshots the peer holds (its catalog, for a store)."""
        ...

    def files(self, snapshot_id: str) -> dict[str, bytes]:
        """A committed snapshot as held: ``{"manifest": bytes, <DiskMap name>: bytes}``."""
        ...

    def lose_sessions(self) -> None:
        """Forget every session, as a peer that restarted."""
        ...

    def leftovers(self) -> list[str]:
        """Sessions still open and what they hold (leases, staged files)."""
        ...


class _Served:
    def __init__(self, server: PeerServer, pki: Pki) -> None:
        self.server = server
        self.pki = pki

    def target(self, streams: int = 2) -> PeerTarget:
        return PeerTarget(
            name=PEER_NAME,
            url=f"https://127.0.0.1:{self.server.port}",
            ssl=self.pki.client_context(),
            streams=streams,
        )


class ReceiverPeer(_Served):
    def __init__(self, server: PeerServer, pki: Pki, store: Store) -> None:
        super().__init__(server, pki)
        self.store = store
        self.receiver: PeerReceiver = server.app[RECEIVER]
        self.encrypted_only = store.keys.data_key is None

    def record(self, chunk_id: bytes) -> bytes | None:
        if self.store.locate(chunk_id) is None:
            return None
        return self.store.get_record(chunk_id)[0]

    def committed(self) -> set[str]:
        listed = {e.snapshot_id for e in self.store.snapshots()}
        assert listed == self.store.layout.committed_snapshots(), "catalog and manifests agree"
        return listed

    def files(self, snapshot_id: str) -> dict[str, bytes]:
        directory = self.store.layout.snapshot_dir(snapshot_id)
        return {p.name: p.read_bytes() for p in directory.iterdir()}

    def lose_sessions(self) -> None:
        self.receiver.close()

    def leftovers(self) -> list[str]:
        layout = self.store.layout
        committed = layout.committed_snapshots()
        out = [f"session {s}" for s in self.receiver.sessions]
        out += [f"lease {lease.what}" for lease in self.store.leases.live()]
        return out + [
            f"uncommitted {d.name}: {sorted(p.name for p in d.iterdir())}"
            for d in layout.snapshots.iterdir()
            if d.name not in committed
        ]


class InMemoryPeer(_Served):
    def __init__(self, server: PeerServer, pki: Pki, peer: MemoryPeer) -> None:
        super().__init__(server, pki)
        self.peer = peer
        self.encrypted_only = peer.keys.data_key is None

    def record(self, chunk_id: bytes) -> bytes | None:
        return self.peer.records.get(chunk_id)

    def committed(self) -> set[str]:
        return set(self.peer.snapshots)

    def files(self, snapshot_id: str) -> dict[str, bytes]:
        return dict(self.peer.snapshots[snapshot_id])

    def lose_sessions(self) -> None:
        self.peer.lose_sessions()

    def leftovers(self) -> list[str]:
        return [
            f"session {s.id} ({len(s.staged)} DiskMaps staged)" for s in self.peer.sessions.values()
        ]


Factory = Callable[[Path, Store, Pki, PullHandler | None], AbstractAsyncContextManager[PeerHarness]]


def receiver(encrypted_only: bool) -> Factory:
    @asynccontextmanager
    async def factory(
        tmp_path: Path, origin: Store, pki: Pki, on_pull: PullHandler | None
    ) -> AsyncIterator[PeerHarness]:
        store = init_replica(tmp_path / "peer", origin, encrypted_only=encrypted_only)
        try:
            app = build_peer_app(store, on_pull=on_pull)
            async with PeerServer(app, "127.0.0.1", 0, pki.server_context()) as server:
                yield ReceiverPeer(server, pki, store)
        finally:
            store.close()

    return factory


@asynccontextmanager
async def in_memory(
    tmp_path: Path, origin: Store, pki: Pki, on_pull: PullHandler | None
) -> AsyncIterator[PeerHarness]:
    keys = StoreKeys(origin.keys.id_key, origin.keys.mac_key, origin.keys.data_key)
    peer = MemoryPeer(keys, origin.config.chunk_size, on_pull)
    async with PeerServer(peer.app(), "127.0.0.1", 0, pki.server_context()) as server:
        yield InMemoryPeer(server, pki, peer)


PEERS: Final[dict[str, Factory]] = {
    "receiver": receiver(encrypted_only=False),
    "receiver-encrypted-only": receiver(encrypted_only=True),
    "memory": in_memory,
}
