"""Block storage volumes: how much a disk on an iSCSI/FC domain may hold, and how the lab
enforces it.

On block storage vdsm keeps each volume in a logical volume of a fixed size, its
*allocation* (vdsm ``blockVolume.calculate_volume_alloc_size``):

- a thin disk (``cow``, sparse) created with ``initial_size`` gets 1.1 × that
  (``QCOW_OVERHEAD_FACTOR``), rounded up to a MiB;
- a thin disk created without it gets ``volume_utilization_chunk_mb`` (1 GiB upstream), in
  128 MiB LVM extents;
- a preallocated disk gets its whole virtual size; a sparse raw disk cannot exist there (the
  engine refuses it, ``restore.create_disk``).

vdsm extends a thin volume while a VM writes to it, never during an image upload (the
SDK's ``upload_disk.py`` sends ``initial_size`` for that reason): an upload or a DataMover
write past the allocation fails with ``No space left on device``. The lab's disks are a few
hundred MiB where real ones are tens of GiB, so its chunk is ``Faults.volume_chunk``
(``LAB_VOLUME_CHUNK``, 1 MiB, rounded to ``LAB_EXTENT``): a restore that sends no
``initial_size`` fails in the lab as it does on a real engine with big disks.

The lab models the logical volume with qemu itself: the qcow2 file is truncated to the
allocation, and a writable export reads it through a ``raw`` node of ``file.size`` =
allocation, so qcow2 gets a real ENOSPC when it would grow past it (``BlockVolumeNbd``).
``Activity.volume_sizes`` holds the allocation of every such file; files not in it (file
storage, preallocated disks, snapshot overlays) grow freely.
"""

import math
from pathlib import Path
from typing import Final

from engine.core.units import MiB
from engine.io import qemu

QCOW_OVERHEAD_FACTOR: Final = 1.1  # vdsm's margin over initial_size for a thin block volume
LAB_VOLUME_CHUNK: Final = 1 * MiB  # vdsm's volume_utilization_chunk_mb is 1024 (real disks)
LAB_EXTENT: Final = 1 * MiB  # vdsm's LVM extents are 128 MiB; the lab's disks are small
BLOCK_TYPES: Final = frozenset({"iscsi", "fcp"})


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def allocation(initial_size: int | None, chunk: int = LAB_VOLUME_CHUNK) -> int:
    """The bytes a new thin volume on block storage gets (module docstring)."""
    if initial_size:
        return _round_up(math.ceil(initial_size * QCOW_OVERHEAD_FACTOR), MiB)
    return _round_up(chunk, LAB_EXTENT)


class BlockVolumeNbd(qemu.QemuNbd):
    """A writable qemu-nbd of a qcow2 volume that cannot grow past ``size`` bytes (a logical
    volume of that size); ``iops`` > 0 adds the lab's throttle filter on top."""

    def __init__(self, image: Path, fmt: str, *, size: int, iops: int = 0) -> None:
        super().__init__(image, fmt)
        self.size = size
        self.iops = iops

    def argv(self, socket: Path) -> list[str]:
        argv = [a for a in super().argv(socket)[:-1] if not a.startswith("--format=")]
        path = str(self.image).replace(",", ",,")  # qemu option syntax escapes commas
        top = "file." if self.iops > 0 else ""  # under the throttle node, one level down
        node = (
            f"{top}driver={self.fmt},{top}file.driver=raw,{top}file.size={self.size},"
            f"{top}file.file.driver=file,{top}file.file.filename={path}"
        )
        if self.iops <= 0:
            return [*argv, "--image-opts", node]
        group = f"throttle-group,id=lab,x-iops-total={self.iops}"
        opts = f"driver=throttle,throttle-group=lab,{node}"
        return [*argv, "--object", group, "--image-opts", opts]


class ThrottledQemuNbd(qemu.QemuNbd):
    """``qemu-nbd`` whose image sits under a ``throttle`` filter of ``iops`` requests/s."""

    def __init__(self, image: Path, fmt: str, *, iops: int, **kwargs: object) -> None:
        super().__init__(image, fmt, **kwargs)  # type: ignore[arg-type]
        self.iops = iops

    def argv(self, socket: Path) -> list[str]:
        argv = [a for a in super().argv(socket)[:-1] if not a.startswith("--format=")]
        path = str(self.image).replace(",", ",,")  # qemu option syntax escapes commas
        opts = (
            f"driver=throttle,throttle-group=lab,file.driver={self.fmt},"
            f"file.file.driver=file,file.file.filename={path}"
        )
        group = f"throttle-group,id=lab,x-iops-total={self.iops}"
        return [*argv, "--object", group, "--image-opts", opts]
