"""What a new disk must be on its storage domain: format, sparseness, ``initial_size``.

File storage (NFS, gluster, POSIX) takes every disk as recorded and grows thin volumes as
they are written. Block storage (iSCSI, FC) keeps each volume in a logical volume of a fixed
size (API-NOTES § 8.1; vdsm ``blockVolume``):

- sparse raw does not exist there: the engine refuses it (400, "Disk configuration (RAW
  Sparse) is incompatible with the storage domain type"). A sparse raw disk is restored as
  a thin qcow2 (``cow``) disk instead: it stays thin and no zeroes need writing; the guest
  sees the same bytes.
- a thin qcow2 disk gets 1.1 × ``initial_size`` (else one ``volume_utilization_chunk_mb``,
  1 GiB), and vdsm does not extend it during an upload, only while a VM writes to it. An
  upload of more than that fails with ENOSPC, so every thin disk created on block storage
  carries ``initial_size`` (as the SDK's ``upload_disk.py`` does, from ``qemu-img
  measure``).
- preallocated disks (raw or qcow2) get their whole virtual size; no ``initial_size``.

``initial_size`` is ``qemu-img measure -O qcow2 --size <virtual>`` (the empty image's
metadata) plus the stored data (``DiskEntry.data_bytes``: non-zero slots × chunk size) in
whole 64 KiB clusters, plus the L2 tables and refcount blocks those clusters need, at most
measure's fully allocated size. It is an upper bound of what ``qemu-img measure`` reports
for the restored image (the test checks that), since zero slots are never written.
"""

import json
from dataclasses import dataclass
from typing import Final

from engine.io import qemu

CLUSTER: Final = 64 * 1024  # qcow2's default cluster size, what the engine creates
L2_ENTRIES: Final = CLUSTER // 8  # 8-byte entries per L2 table: one table maps 512 MiB
REFCOUNTS: Final = CLUSTER * 8 // 16  # 16-bit refcounts per refcount block


@dataclass(frozen=True, slots=True)
class DiskShape:
    """What to ask the engine for: ``format`` (cow, raw), ``sparse``, ``initial_size``."""

    format: str
    sparse: bool
    initial_size: int | None = None


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit)


async def measure(virtual: int) -> tuple[int, int]:
    """``qemu-img measure -O qcow2 --size``: (required for an empty image, fully allocated).

    Raises ``qemu.QemuError`` if qemu-img fails."""
    out = await qemu.qemu_img("measure", "--output=json", "-O", "qcow2", "--size", str(virtual))
    facts = json.loads(out)
    return int(facts["required"]), int(facts["fully-allocated"])


async def initial_size(virtual: int, data_bytes: int) -> int:
    """The bytes a thin qcow2 volume of ``virtual`` size needs for ``data_bytes`` of data
    written in whole clusters anywhere in the disk (module docstring)."""
    empty, full = await measure(virtual)
    clusters = _ceil(data_bytes, CLUSTER)
    l2_tables = min(clusters, _ceil(virtual, L2_ENTRIES * CLUSTER))
    refblocks = _ceil(clusters + l2_tables, REFCOUNTS)
    return min(full, empty + (clusters + l2_tables + refblocks) * CLUSTER)


async def shape(fmt: str, sparse: bool, *, block: bool, virtual: int, data_bytes: int) -> DiskShape:
    """The disk to create for a recorded ``fmt``/``sparse`` on a block or file domain."""
    if not block:
        return DiskShape(fmt, sparse)
    if not sparse:
        return DiskShape(fmt, False)  # a preallocated volume is its whole size
    return DiskShape("cow", True, await initial_size(virtual, data_bytes))
