"""The DataMover VM as the LAN-free flows see it: which VM it is, the device a disk attached
to it shows up as, and a writable qemu-nbd over such a device.

Device discovery: the engine sets the disk's serial to its id; the guest sees the first 20
characters (virtio-blk: ``virtio-<20>``; virtio-scsi: udev's ``scsi-0QEMU_QEMU_HARDDISK_<20>``,
or the full id in ``scsi-…`` links of newer QEMU). A name matches when the part after a known
prefix starts with those 20 characters; ``-partN`` links never match. The directory is
``datamover.by_id_dir`` (the lab points it at its own); two matches are an error, not a guess.
"""

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

from engine.config.models import DataMoverSection
from engine.core.errors import ConfigError, EngineError
from engine.io import qemu
from engine.restore.nbd_target import DEFAULT_MAX_CONNECTIONS
from plugins.ovirt.client import EngineClient
from plugins.ovirt.inventory import VmRef, datamover_vm

SERIAL_PREFIX: Final = 20  # serial bytes a guest sees (VIRTIO_BLK_ID_BYTES; SCSI device id)
BY_ID_PREFIXES: Final = ("virtio-", "scsi-0QEMU_QEMU_HARDDISK_", "scsi-SQEMU_QEMU_HARDDISK_")
DEVICE_POLL: Final = 0.1  # seconds between looks for the device: udev links it in ~100 ms


class OvirtAttachError(EngineError):
    template = "disk {disk} on DataMover {datamover}: {reason}"


def find_devices(by_id_dir: Path, disk_id: str) -> list[Path]:
    """The by-id links whose serial part starts with the first 20 chars of ``disk_id``."""
    prefix = disk_id[:SERIAL_PREFIX].lower()
    try:
        names = sorted(os.listdir(by_id_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if "-part" in name or name.endswith(".tmp"):
            continue
        for known in BY_ID_PREFIXES:
            if name.startswith(known) and name[len(known) :].lower().startswith(prefix):
                found.append(by_id_dir / name)
    return found


async def wait_device(by_id_dir: Path, disk_id: str, timeout: float, datamover: str) -> Path:
    """The device of ``disk_id`` once it exists (a link that resolves); raises
    ``OvirtAttachError`` after ``timeout`` seconds, or at once for two different devices."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = [p for p in find_devices(by_id_dir, disk_id) if p.exists()]
        if len({os.path.realpath(p) for p in found}) > 1:
            raise OvirtAttachError(
                disk=disk_id,
                datamover=datamover,
                reason=f"several devices match its serial: {', '.join(map(str, found))}",
            )
        if found:
            return found[0]
        if loop.time() > deadline:
            raise OvirtAttachError(
                disk=disk_id,
                datamover=datamover,
                reason=f"no device with serial {disk_id[:SERIAL_PREFIX]} appeared in "
                f"{by_id_dir} within {timeout:g} s",
            )
        await asyncio.sleep(DEVICE_POLL)


def fsync_device(path: Path) -> None:
    """Make what was written to the device through qemu-nbd durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def find_datamover(client: EngineClient, section: DataMoverSection | None) -> VmRef:
    """The DataMover VM of the configuration (``datamover.vm_name`` or ``host_uuid``)."""
    if section is None:
        raise ConfigError(
            message="the snapshot-attach flow and restores through the DataMover need a "
            "datamover section"
        )
    return await datamover_vm(client, section.vm_name, section.host_uuid)


async def serve_writable(
    device: Path, journal: Callable[[qemu.QemuNbd], Awaitable[None]]
) -> qemu.QemuNbd:
    """qemu-nbd over the device, O_DIRECT first (a block device takes it; a FUSE file may
    not, then the page cache is used and the fsync at the end makes it durable). Each
    attempt is prepared and given to ``journal`` before its process starts."""
    last: Exception | None = None
    for cache in ("none", "writeback"):
        export = qemu.QemuNbd(
            device, "raw", read_only=False, cache=cache, shared=DEFAULT_MAX_CONNECTIONS
        )
        export.prepare()
        await journal(export)
        try:
            await export.start()
        except qemu.QemuError as e:
            last = e
            continue
        return export
    assert last is not None
    raise last
