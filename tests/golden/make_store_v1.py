"""How the golden store of format v1 (``tests/golden/store-v1/``) was made. Run once, never
again: ``tests/golden/test_store_v1.py`` opens the committed bytes, and a store written by
a later version of this script would prove nothing about the stores operators already
have. A new format version gets a new golden store (``store-v2/``) and a script of its own.

    python -m tests.golden.make_store_v1 [--out DIR]   # from the repository root

What it writes into ``DIR`` (default ``tests/golden/store-v1``, which must not exist):

- ``store/``: a store made by ``Store.init`` (chunks of 64 KiB, the smallest the format
  allows, so the files stay small; packs of 1 MiB; AES-256-GCM) holding four snapshots,
  written through the same ``Store`` calls a backup makes (``begin_snapshot``, ``put``
  of each non-zero slot's record, ``DiskMapWriter.set``, ``set_config``, ``commit``),
  not through a ``Source``:

      alpha  full          alpha-root: text, a zero run, one block twice, a short last slot
      alpha  incremental   parent the full: one slot changed, a zero slot filled, one zeroed
      beta   full          beta-root: alpha-root with one slot changed (dedup across VMs);
                           beta-data: text, zero, a short slot of random bytes (stored
                           uncompressed: zstd does not shrink it)
      beta   differential  parent the full: one slot of beta-data changed

  Each snapshot carries an OVF-like configuration, tags, a consistency and disk
  attributes, as a backup's manifest does. The key file is ``store/keys/key``, wrapped
  with ``PASSPHRASE`` through scrypt at a cheap cost (``KDF``: the default costs ~0.3 s
  per open); the catalog is ``store/catalog.db``. The writer lock file is removed (it
  holds this process's pid, not store data).
- ``expected.json``: the store's id and settings, the passphrase, every snapshot with its
  manifest fields and, per disk, the size, zero slots and SHA-256 of the disk's bytes (of
  the plaintext written, computed here, never read back from the store), the SHA-256 of
  each configuration, the number of chunks and packs, and the SHA-256 of every file of
  ``store/`` (the test checks the committed files are these bytes).

Times are fixed; snapshot ids, the store id, keys, nonces and pack names are random, so a
second run makes different bytes: that is why the first run's output is committed.
"""

import argparse
import hashlib
import json
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from engine.core.ids import ZERO_ID, ChunkId
from engine.store import format as fmt
from engine.store.chunk_store import Store
from engine.store.keys import KdfParams
from engine.store.manifest import Manifest

CHUNK: Final = 64 * 1024
PACK_SIZE: Final = 1024 * 1024
PASSPHRASE: Final = b"tessera golden store v1"
KDF: Final = KdfParams(n=2**10, r=8, p=1)
T0: Final = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
DEFAULT_OUT: Final = Path(__file__).parent / "store-v1"

_WORDS: Final = (
    b"the of and to in is was for on with as by at from this that disk block inode "
    b"journal extent page cache kernel module boot log error warning info user group "
    b"root home var lib etc usr bin share doc systemd service timer mount device"
).split()


def text(seed: int, size: int) -> bytes:
    """Deterministic log-like lines (compressible, like most of a guest's data)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        words = b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        out += b"%06d " % rng.randrange(10**6) + words + b"\n"
    return bytes(out[:size])


def noise(seed: int, size: int) -> bytes:
    """Deterministic random bytes: zstd cannot shrink them, so the record is stored raw."""
    return random.Random(seed).randbytes(size)


def ovf(vm: str, disks: list[str]) -> bytes:
    items = "".join(f'<Item id="{d}"/>' for d in disks)
    return f'<?xml version="1.0"?><ovf:Envelope name="{vm}">{items}</ovf:Envelope>'.encode()


def alpha_root() -> bytearray:
    """10 slots: 3 of text, 3 zero, one block twice, text, and a short last slot."""
    block = text(4, CHUNK)
    return bytearray(
        text(1, 3 * CHUNK) + bytes(3 * CHUNK) + block + block + text(5, CHUNK) + text(6, 20000)
    )


def put_slot(data: bytearray, slot: int, chunk: bytes) -> None:
    data[slot * CHUNK : slot * CHUNK + len(chunk)] = chunk


def backup(
    store: Store,
    vm: tuple[str, str],
    level: str,
    parent: Manifest | None,
    time: datetime,
    disks: list[tuple[str, str, bytes]],
    number: int,
) -> Manifest:
    """One snapshot through the calls a backup makes; slots of zeros get the ZERO id."""
    vm_id, vm_name = vm
    with store.begin_snapshot(
        vm_id, vm_name, level, parent.snapshot_id if parent else None, time
    ) as snap:
        snap.set_config("ovf", ovf(vm_name, [d for d, _, _ in disks]))
        for disk_id, name, data in disks:
            attributes = {"format": "raw", "interface": "virtio_scsi", "bootable": "false"}
            if name.endswith("-root"):
                attributes["bootable"] = "true"
            writer = snap.add_disk(disk_id, name, len(data), attributes)
            for slot, start in enumerate(range(0, len(data), CHUNK)):
                chunk = data[start : start + CHUNK]
                writer.set(slot, ZERO_ID if not any(chunk) else store.put_chunk(chunk))
            snap.annotate(writer, {"read": "full" if parent is None else "dirty"})
        tags = {"job": f"golden-{number}", "checkpoint": f"tessera-golden-{number}"}
        return snap.commit(consistency="crash", tags=tags)


def describe(
    manifest: Manifest, disks: list[tuple[str, str, bytes]], store: Store
) -> dict[str, object]:
    assert manifest.config is not None
    config = store.read_chunk(ChunkId(bytes.fromhex(manifest.config.chunk_id)))
    return {
        "snapshot_id": manifest.snapshot_id,
        "vm_id": manifest.vm_id,
        "vm_name": manifest.vm_name,
        "level": manifest.level,
        "parent": manifest.parent,
        "time": manifest.time,
        "consistency": manifest.consistency,
        "tags": manifest.tags,
        "config": {
            "format": manifest.config.format,
            "size": len(config),
            "sha256": hashlib.sha256(config).hexdigest(),
        },
        "disks": [
            {
                "disk_id": disk_id,
                "name": name,
                "size": len(data),
                "zero_slots": sum(not any(data[s : s + CHUNK]) for s in range(0, len(data), CHUNK)),
                "attributes": entry.attributes,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            for (disk_id, name, data), entry in zip(disks, manifest.disks, strict=True)
        ],
    }


def make(out: Path) -> None:
    root = out / "store"
    Store.init(
        root,
        chunk_size=CHUNK,
        encryption="aes-256-gcm",
        pack_size=PACK_SIZE,
        passphrase=PASSPHRASE,
        kdf=KDF,
    )
    alpha = ("6f1e3c1a-0000-4000-8000-00000000a1fa", "alpha")
    beta = ("6f1e3c1a-0000-4000-8000-00000000be7a", "beta")
    a_root, b_root, b_data = (f"6f1e3c1a-0000-4000-8000-0000000000d{i}" for i in (1, 2, 3))
    snapshots = []
    with Store.open(root, passphrase=PASSPHRASE) as store:
        disk = alpha_root()
        disks = [(a_root, "alpha-root", bytes(disk))]
        full = backup(store, alpha, "full", None, T0, disks, 1)
        snapshots.append(describe(full, disks, store))

        put_slot(disk, 1, text(7, CHUNK))  # changed
        put_slot(disk, 4, text(8, CHUNK))  # was zero
        put_slot(disk, 8, bytes(CHUNK))  # now zero
        disks = [(a_root, "alpha-root", bytes(disk))]
        incr = backup(store, alpha, "incremental", full, T0 + timedelta(days=1), disks, 2)
        snapshots.append(describe(incr, disks, store))

        clone = alpha_root()
        put_slot(clone, 0, text(9, CHUNK))
        data = text(10, CHUNK) + bytes(CHUNK) + noise(11, 8192)
        disks = [(b_root, "beta-root", bytes(clone)), (b_data, "beta-data", data)]
        full_b = backup(store, beta, "full", None, T0 + timedelta(hours=1), disks, 3)
        snapshots.append(describe(full_b, disks, store))

        data = text(12, CHUNK) + data[CHUNK:]
        disks = [(b_root, "beta-root", bytes(clone)), (b_data, "beta-data", data)]
        diff = backup(
            store, beta, "differential", full_b, T0 + timedelta(days=1, hours=1), disks, 4
        )
        snapshots.append(describe(diff, disks, store))
        info = store.info()
    (root / "lock").unlink()
    leftovers = [p.name for p in root.glob("*.db-*")]
    if leftovers:
        sys.exit(f"SQLite left {leftovers} after close: not a clean golden store")
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    expected = {
        "made_by": "tests/golden/make_store_v1.py",
        "format": fmt.FORMAT_VERSION,
        "passphrase": PASSPHRASE.decode(),
        "store": {
            "store_id": info.store_id,
            "chunk_size": info.chunk_size,
            "encryption": info.encryption,
            "pack_size": info.pack_size,
            "chunks": info.chunks,
            "packs": info.packs,
        },
        "snapshots": snapshots,
        "files": files,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum((root / f).stat().st_size for f in files)
    print(
        f"{out}: {len(snapshots)} snapshots, {info.chunks} chunks, {info.packs} packs, "
        f"{len(files)} files, {total} bytes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    if out.exists():
        sys.exit(f"{out} exists: a committed golden store is never regenerated")
    out.mkdir(parents=True)
    make(out)


if __name__ == "__main__":
    main()
