"""The peer protocol's names, bounds and messages — shared by sender and receiver.

All routes live under ``/peer/v1``. Bodies are JSON (msgspec) except the three bulk
bodies, which are raw bytes:

- an id list: ``n × 32`` bytes of chunk ids (``lacking`` request and answer);
- a record batch: records back to back exactly as stored (each is self-delimiting: its
  header gives the payload length, its CRC32 closes it — ``engine.store.format``);
- a DiskMap or a manifest: the file's bytes.
"""

from typing import Final

import blake3
import msgspec

from engine.core.errors import EngineError
from engine.core.ids import CHUNK_ID_SIZE
from engine.core.units import MiB
from engine.store.keys import StoreKeys

PREFIX: Final = "/peer/v1"
PROTOCOL_VERSION: Final = 1

# Ids per "which do you lack" request: 4096 × 32 B = 128 KiB each way, one SQLite lookup
# per id on the receiver (~20-50 ms per request), small next to the records they stand for.
OFFER_BATCH: Final = 4096
# Record bytes per records request. A batch is what a CRC failure or a broken stream makes
# the sender send again, and what the receiver seals into a pack at its end; 16 MiB keeps a
# retry cheap and packs tens of MB large when several streams share the open pack.
RECORD_BATCH_BYTES: Final = 16 * MiB
# Largest DiskMap accepted: 64 + 32 bytes per slot; 256 MiB is 8 M slots (8 TiB at 1 MiB).
MAX_DISKMAP_BYTES: Final = 256 * MiB
MAX_MANIFEST_BYTES: Final = 4 * MiB
MAX_JSON_BYTES: Final = 64 * 1024


class PeerError(EngineError):
    """The peer refused or failed a request (``status`` is its HTTP status, 0: no answer)."""

    template = "peer {peer}: {reason}"


class TransientPeerError(PeerError):
    """A broken connection or a 5xx: the sender retries the request."""

    retryable = True


class SessionLost(PeerError):
    """The receiver no longer knows the session (it restarted, or the session expired):
    the job opens a new one and offers again; what arrived is not sent twice."""


class BatchRejected(PeerError):
    """The receiver found a damaged record in a batch (CRC or decode): the batch is resent."""

    retryable = True


def key_fingerprint(keys: StoreKeys) -> str:
    """Proves two stores share id-key and mac-key without revealing either (a keyed MAC of
    the id-key's hash under the mac-key)."""
    return keys.mac(b"tessera-peer-v1|ids|" + blake3.blake3(keys.id_key).digest()).hex()


def data_key_fingerprint(keys: StoreKeys) -> str | None:
    if keys.data_key is None:
        return None
    return keys.mac(b"tessera-peer-v1|data|" + blake3.blake3(keys.data_key).digest()).hex()


def split_ids(body: bytes) -> list[bytes]:
    if len(body) % CHUNK_ID_SIZE:
        raise ValueError(f"id list of {len(body)} bytes is not a multiple of {CHUNK_ID_SIZE}")
    return [body[i : i + CHUNK_ID_SIZE] for i in range(0, len(body), CHUNK_ID_SIZE)]


class OpenSession(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protocol: int
    sender: str  # the sending site's name, for the receiver's log and lease
    snapshot_id: str
    vm_id: str
    vm_name: str
    chunk_size: int
    keys: str  # key_fingerprint
    data_key: str | None  # data_key_fingerprint (None: the sender stores plaintext records)
    base: str | None = None  # snapshot the sender diffs against, if the receiver holds it


class SessionOpened(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    session: str
    committed: bool  # the receiver already holds this snapshot: nothing to send
    base_held: bool  # the receiver holds ``base`` committed (else the sender sends in full)
    encrypted_only: bool  # the receiver holds no data key: it checks CRCs only


class BatchResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    records: int  # records in the batch, all durable now
    stored: int  # new to the receiver
    existing: int  # already there (another stream or an earlier attempt brought them)
    bytes: int  # record bytes received


class Refusal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    error: str
    chunk: str | None = None
    durable: int = 0  # records of the batch made durable before the damaged one


class PullRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A peer asks this site to push it the newest snapshot of each VM named (names or
    globs, matched against this site's snapshots)."""

    vms: tuple[str, ...]


class PullAccepted(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    jobs: tuple[str, ...]  # the replication jobs started here, one per VM found


class Committed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    snapshot_id: str
    disks: int
