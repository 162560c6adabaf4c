"""The lab DataMover's local block devices: an attached disk as a file under a by-id directory.

A real DataMover VM sees a hot-plugged disk as ``/dev/sdX`` with a udev link in
``/dev/disk/by-id`` named from the disk's serial, which the engine sets to the disk id
(API-NOTES § 7 step 8). The lab has no guest and no ``/dev/nbd*``, so it builds the same
picture with FUSE::

    image (qcow2/raw) ◀── qemu-nbd (unix socket; --snapshot for a snapshot disk)
                              [◀── disklayer: a writable disk's punched hole reads as zeroes]
                              ◀── nbdfuse MNT/<disk id> --unix SOCKET   → MNT/<disk id>/nbd
    BY_ID/scsi-0QEMU_QEMU_HARDDISK_<first 20 chars of the disk id> ──symlink──▶ …/nbd
    BY_ID/virtio-<first 20 chars>                 (for a virtio-blk attachment)

``MNT/<disk id>/nbd`` is a regular file of the disk's virtual size holding its guest data as
raw bytes. A snapshot disk is served by ``qemu-nbd --snapshot``: writes land in a temporary
overlay that goes away with the device, so the snapshot never changes (the engine attaches
snapshot disks *transient*). A plain disk is served writable and its writes persist in the
image once the device is unplugged (``qemu-nbd`` exits only after the unmount, flushing).
nbdfuse sends a punched hole as an NBD trim, which qemu-nbd may drop for part of a qcow2
cluster; a real disk zeroes it (SCSI WRITE SAME with UNMAP). So a writable disk's nbdfuse
talks to ``disklayer``, which turns the trim into a zeroing that may unmap.

Unplugging removes the link, unmounts (lazily if something still holds the file open, then
the FUSE daemon is stopped so such holders see I/O errors, like a hot-unplugged disk), then
stops qemu-nbd. ``unmount_all`` unmounts whatever a killed lab left under a directory
(``tessera lab down`` and ``up`` call it).

Needs root, ``/dev/fuse`` and ``nbdfuse`` (Debian package ``libnbd-bin``).
"""

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.io import qemu
from plugins.lab.engine.disklayer import DiskLayer
from plugins.lab.engine.volumes import BlockVolumeNbd, ThrottledQemuNbd

SERIAL_PREFIX: Final = 20  # what the guest sees of the serial (VIRTIO_BLK_ID_BYTES, SCSI devid)
MOUNT_TIMEOUT: Final = 20.0  # nbdfuse mounts within a second; a loaded CI machine is slow
UNMOUNT_TIMEOUT: Final = 10.0  # then the FUSE daemon is killed
LINK_PREFIX: Final = {"virtio": "virtio-", "virtio_scsi": "scsi-0QEMU_QEMU_HARDDISK_"}


class DeviceError(Exception):
    """A device could not be made (nbdfuse or qemu-nbd failed); the message names the disk."""


def link_name(disk_id: str, interface: str) -> str:
    """The by-id name udev gives the device of ``disk_id`` attached on ``interface``."""
    prefix = LINK_PREFIX.get(interface, LINK_PREFIX["virtio_scsi"])
    return prefix + disk_id[:SERIAL_PREFIX]


class _TransientNbd(qemu.QemuNbd):
    """qemu-nbd with ``--snapshot``: writes go to a temporary overlay, the image stays."""

    def argv(self, socket: Path) -> list[str]:
        argv = super().argv(socket)
        return [argv[0], "--snapshot", *argv[1:]]  # before any --image-opts


class _TransientThrottledNbd(_TransientNbd, ThrottledQemuNbd):
    """A transient device on slow storage (``Faults.storage_iops``)."""


@dataclass
class Device:
    disk_id: str
    link: Path
    mountpoint: Path
    nbd: qemu.QemuNbd
    layer: DiskLayer | None = None  # writable devices: a punched hole reads as zeroes
    fuse: asyncio.subprocess.Process | None = None


class Devices:
    """The DataMover's devices: ``by_id`` holds the links, ``mounts`` the FUSE mounts."""

    def __init__(self, by_id: Path, mounts: Path) -> None:
        self.by_id = by_id
        self.mounts = mounts
        self.plugged: dict[str, Device] = {}  # disk id → device

    def path(self, disk_id: str) -> Path | None:
        device = self.plugged.get(disk_id)
        return device.link if device else None

    async def plug(
        self,
        disk_id: str,
        interface: str,
        image: Path,
        fmt: str,
        *,
        transient: bool,
        volume_size: int | None = None,
        iops: int = 0,
    ) -> Path:
        """Expose ``image`` (format ``fmt``) as the device of ``disk_id``; returns the link.
        ``volume_size``: the image is a block volume of that allocation, which writes
        through the device cannot pass (ENOSPC, ``volumes``). ``iops`` > 0: the storage
        serves at most that many requests per second (``Faults.storage_iops``), as it does
        for an image transfer's qemu-nbd.

        Raises ``DeviceError`` naming the disk; nothing is left then."""
        if disk_id in self.plugged:
            raise DeviceError(f"disk {disk_id} is already plugged into the DataMover")
        self.by_id.mkdir(parents=True, exist_ok=True)
        mountpoint = self.mounts / disk_id
        mountpoint.mkdir(parents=True, exist_ok=True)
        nbd: qemu.QemuNbd
        if transient and iops > 0:
            nbd = _TransientThrottledNbd(image, fmt, iops=iops)
        elif transient:
            nbd = _TransientNbd(image, fmt)
        elif volume_size is not None:
            nbd = BlockVolumeNbd(image, fmt, size=volume_size, iops=iops)
        elif iops > 0:
            nbd = ThrottledQemuNbd(image, fmt, iops=iops)
        else:
            nbd = qemu.QemuNbd(image, fmt)
        device = Device(disk_id, self.by_id / link_name(disk_id, interface), mountpoint, nbd)
        try:
            await device.nbd.start()
            served = device.nbd.address
            if not transient:
                device.layer = DiskLayer(served)
                await device.layer.start()
                served = device.layer.address
            device.fuse = await mount_fuse(mountpoint, served, disk_id)
            tmp = device.link.with_name(device.link.name + ".tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(mountpoint / "nbd")
            tmp.rename(device.link)  # appears whole, as udev's link does
        except BaseException as e:
            await _teardown(device)
            if isinstance(e, qemu.QemuError):
                raise DeviceError(f"disk {disk_id}: qemu-nbd failed: {e}") from e
            raise
        self.plugged[disk_id] = device
        return device.link

    async def unplug(self, disk_id: str) -> None:
        """Remove the device of ``disk_id`` (link, mount, qemu-nbd); unknown ids are fine."""
        device = self.plugged.pop(disk_id, None)
        if device is not None:
            await _teardown(device)

    async def close(self) -> None:
        """Unplug every device, then unmount anything left under ``mounts``; idempotent."""
        for disk_id in list(self.plugged):
            await self.unplug(disk_id)
        await unmount_all(self.mounts)


async def mount_fuse(mountpoint: Path, socket: Path, disk_id: str) -> asyncio.subprocess.Process:
    """Start nbdfuse on ``mountpoint`` for the NBD server at ``socket`` and wait until its
    file (``mountpoint / "nbd"``) is there; returns the nbdfuse process. Raises
    ``DeviceError`` naming ``disk_id`` (nbdfuse missing, exited or too slow)."""
    if shutil.which("nbdfuse") is None:
        raise DeviceError(
            f"disk {disk_id}: nbdfuse is not installed (Debian package libnbd-bin); the lab "
            "needs it to show attached disks as DataMover devices"
        )
    stderr = mountpoint.with_name(mountpoint.name + ".log")
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            "nbdfuse",
            str(mountpoint),
            "--unix",
            str(socket),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MOUNT_TIMEOUT
    while not (os.path.ismount(mountpoint) and (mountpoint / "nbd").exists()):
        if proc.returncode is not None or loop.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            text = stderr.read_text(errors="replace").strip()[-500:]
            raise DeviceError(f"disk {disk_id}: nbdfuse did not mount {mountpoint}: {text}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await proc.wait()
    stderr.unlink(missing_ok=True)
    return proc


async def unmount_fuse(mountpoint: Path, fuse: asyncio.subprocess.Process | None) -> None:
    """Unmount ``mountpoint`` (lazily if busy) and wait for its nbdfuse ``fuse`` to exit,
    killing it after ``UNMOUNT_TIMEOUT``: whoever still holds the file gets EIO, as from a
    hot-unplugged disk."""
    if os.path.ismount(mountpoint):
        await _umount(mountpoint)
    if fuse is not None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNMOUNT_TIMEOUT):
                await fuse.wait()
        if fuse.returncode is None:
            fuse.kill()
            await fuse.wait()


async def _teardown(device: Device) -> None:
    device.link.unlink(missing_ok=True)
    try:
        await unmount_fuse(device.mountpoint, device.fuse)
    finally:
        try:
            if device.layer is not None:
                await device.layer.stop()
        finally:
            await device.nbd.stop()  # after nbdfuse disconnected: qemu-nbd flushes and exits
        with contextlib.suppress(OSError):
            device.mountpoint.rmdir()
        device.mountpoint.with_name(device.mountpoint.name + ".log").unlink(missing_ok=True)


async def _umount(mountpoint: Path) -> None:
    """``umount``; if busy, ``umount -l`` (the mount goes away when its last user closes)."""
    for argv in (["umount", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        if await proc.wait() == 0:
            return


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` (from ``/proc/self/mounts``), deepest first."""
    root = os.path.realpath(directory)
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                point = fields[1].encode().decode("unicode_escape")  # \040 for a space
                if point == root or point.startswith(root + os.sep):
                    found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


async def unmount_all(directory: Path) -> list[Path]:
    """Unmount every mount at or below ``directory`` (lazily if busy); returns them."""
    points = mounts_under(directory)
    for point in points:
        await _umount(point)
    return points
