"""Manifests: the commit point of a snapshot.

A snapshot exists if and only if its manifest file exists. The manifest names the VM, the
time, the level and parent, the VM configuration stream (e.g. the OVF, stored as a chunk so
it is deduplicated and encrypted like disk data) and one DiskMap per disk with the checksum
of its id array. It is JSON, authenticated with a keyed BLAKE3 MAC (the store's mac-key)
over the exact body bytes: changing one byte of the file, or swapping a DiskMap under it, is
detected. Layout: ``MANIFEST_MAGIC ‖ mac hex ‖ \\n ‖ body`` (see ``format``).

Tags a backup writes (``tags``): ``job``, ``checkpoint``, ``skipped_disks``, and who made it
(``origin_tags``): ``origin: policy`` with ``policy: <name>`` for a policy's run, ``origin:
manual`` for a backup started by hand (``tessera backup``, the API without a policy). A
policy's retention leaves manual snapshots alone unless it says ``include_manual``.
Snapshots written before the tag existed have no ``origin`` and count as a policy's.
"""

import hmac
from pathlib import Path

import msgspec

from engine.core.errors import ManifestTampered
from engine.store import format as fmt
from engine.store.keys import StoreKeys

ORIGIN_TAG = "origin"
POLICY_TAG = "policy"
ORIGIN_POLICY = "policy"
ORIGIN_MANUAL = "manual"


def origin_tags(policy: str | None) -> dict[str, str]:
    """The tags naming who made a snapshot: the policy ``policy`` (a name), else a person."""
    if policy is None:
        return {ORIGIN_TAG: ORIGIN_MANUAL}
    return {ORIGIN_TAG: ORIGIN_POLICY, POLICY_TAG: policy}


class ConfigStream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The VM configuration saved with the snapshot (first stream of a backup)."""

    format: str  # "ovf", "json", ...
    chunk_id: str  # hex; the config is stored as one chunk
    size: int


class DiskEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    disk_id: str
    name: str
    size: int  # virtual size in bytes
    diskmap: str  # file name inside the snapshot directory
    diskmap_checksum: str  # hex BLAKE3 of the DiskMap's id array
    data_bytes: int = 0  # bytes in non-zero slots (what dedup and compression work on)
    attributes: dict[str, str] = {}  # source facts for restore: format, interface, bootable…


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    snapshot_id: str
    store_id: str
    vm_id: str
    vm_name: str
    time: str  # RFC 3339, UTC
    level: str  # full | incremental | differential
    parent: str | None
    chunk_size: int
    disks: tuple[DiskEntry, ...]
    config: ConfigStream | None = None
    consistency: str | None = None  # application | crash
    tags: dict[str, str] = {}

    @property
    def data_bytes(self) -> int:
        return sum(d.data_bytes for d in self.disks)

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)


def encode(manifest: Manifest, keys: StoreKeys) -> bytes:
    body = msgspec.json.encode(manifest)
    return fmt.MANIFEST_MAGIC + keys.mac(body).hex().encode() + b"\n" + body


def decode(raw: bytes, keys: StoreKeys, snapshot: str, path: Path | str) -> Manifest:
    """Authenticate then parse; raises ManifestTampered naming the snapshot and file."""
    head = len(fmt.MANIFEST_MAGIC)
    if (
        not raw.startswith(fmt.MANIFEST_MAGIC)
        or raw[head + fmt.MANIFEST_MAC_HEX : head + fmt.MANIFEST_MAC_HEX + 1] != b"\n"
    ):
        raise ManifestTampered(snapshot=snapshot, path=path, reason="not a Tessera manifest")
    mac_hex = raw[head : head + fmt.MANIFEST_MAC_HEX]
    body = raw[head + fmt.MANIFEST_MAC_HEX + 1 :]
    if not hmac.compare_digest(mac_hex, keys.mac(body).hex().encode()):
        raise ManifestTampered(snapshot=snapshot, path=path, reason="MAC mismatch")
    try:
        manifest = msgspec.json.decode(body, type=Manifest)
    except msgspec.ValidationError as e:
        raise ManifestTampered(snapshot=snapshot, path=path, reason=f"bad body: {e}") from e
    if manifest.snapshot_id != snapshot:
        raise ManifestTampered(
            snapshot=snapshot, path=path, reason=f"body names snapshot {manifest.snapshot_id}"
        )
    return manifest
