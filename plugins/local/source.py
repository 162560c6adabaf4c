"""Local images as a backup Source: a raw image read directly, any other format (qcow2)
through a read-only ``qemu-nbd``.

A raw image (format ``raw`` in ``qemu-img info``: a file or a block device) holds the disk's
bytes as they are, so it is read in place (``engine.io.direct``: ``preadv`` by N readers,
holes from ``SEEK_DATA``/``SEEK_HOLE`` reported as zero extents). No process is started
and nothing is journaled for it: a killed backup leaves nothing behind. Its size is the
file's (``qemu-img info`` rounds a raw file up to 512-byte sectors). A raw image has no
bitmaps: every run reads it fully (``fallback_reason`` says so when an incremental was
asked for).

A qcow2 image needs qemu's format driver and keeps the checkpoints: persistent dirty bitmaps
named ``tessera-<job>``::

    run N:  check parent bitmap ──▶ add bitmap N (records writes from now on)
            ──▶ qemu-nbd --read-only [-B parent] ──▶ read (all, or dirty since parent)
            ──▶ success: stop, remove bitmaps other than N and the kept ones (last full's)
                failure: stop, remove bitmap N (the parent stays valid for the next run)

A bitmap that is missing, or flagged ``in-use`` (not saved cleanly after a crash: its
contents cannot be trusted), makes that disk a full read with the reason recorded.

Nobody may write an image while it is read: nothing enforces it (qemu's image locks do
not keep writers out of a read-only qemu-nbd either; adding a bitmap needs qemu's write
lock, so a qcow2 image a running VM holds is refused up front).

Journal keys (each written before what it names exists), for qcow2 images only:
``bitmaps_added``, ``new_checkpoint``/``keep_checkpoints``, ``exports`` (each qemu-nbd's
private directory, and its pid once started; ``export_records``) and, from the restore
target, ``partial_images``. ``recover`` stops exports found by their directories
(``stop_exports``), removes partial images and fixes bitmaps; every step is idempotent.
"""

import hashlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from engine.core.extent import Extent
from engine.io import qemu
from engine.io.direct import DirectImage, DirectReader
from engine.io.exports import export_records, stop_exports
from engine.io.nbd.client import NbdClient, connect, extents
from engine.sources.types import BackupSession, DiskInfo, ResourceRecorder, SourceDisk, VmInfo

BITMAP_PREFIX = "tessera-"
log = structlog.get_logger("tessera.local")


def image_vm_id(path: Path) -> str:
    """A stable id for an image: its real path (hashed so ids stay short and opaque)."""
    return "image-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


def bitmap_flags(info: dict[str, Any]) -> dict[str, list[str]]:
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: list(b.get("flags", [])) for b in data.get("bitmaps", []) or []}


class NbdReader:
    """DiskReader over one NBD connection."""

    def __init__(self, client: NbdClient):
        self._client = client

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self._client.readinto(offset, buf)

    async def close(self) -> None:
        await self._client.close()


class LocalSourceDisk:
    """An image behind a read-only qemu-nbd (qcow2, or any format but raw)."""

    def __init__(
        self,
        info: DiskInfo,
        export: qemu.QemuNbd,
        control: NbdClient,
        parent: str | None,
        reason: str | None,
    ):
        self.info = info
        self.checkpoint_parent = parent
        self.fallback_reason = reason
        self._export = export
        self._control = control

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return [e async for e in extents(self._control, offset, length, "base:allocation")]

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        assert self.checkpoint_parent is not None
        context = f"qemu:dirty-bitmap:{self.checkpoint_parent}"
        return [e async for e in extents(self._control, offset, length, context)]

    async def open_reader(self) -> NbdReader:
        return NbdReader(await connect(self._export.address))

    async def release(self) -> None:
        """Nothing to free early: the session's ``close`` stops the export."""


class RawImageDisk:
    """A raw image read directly: every run reads it fully (it has no bitmaps)."""

    def __init__(self, info: DiskInfo, image: DirectImage, reason: str | None):
        self.info = info
        self.checkpoint_parent: str | None = None
        self.fallback_reason = reason
        self._image = image

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await self._image.extents(offset, length)

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        raise RuntimeError("a raw image has no dirty bitmaps: it is never read incrementally")

    async def open_reader(self) -> DirectReader:
        return await self._image.open_reader()

    async def release(self) -> None:
        """Nothing to free early: the session's ``close`` closes the image."""


class LocalSession:
    """The images of one run; ``paths`` are its qcow2 images (whose bitmaps ``close`` keeps
    or drops). ``close`` closes the raw images, stops the exports, then fixes bitmaps."""

    def __init__(self, vm: VmInfo, new_checkpoint: str, keep: Sequence[str], paths: list[Path]):
        self.vm = vm
        self.new_checkpoint = new_checkpoint
        self.local_disks: list[LocalSourceDisk | RawImageDisk] = []
        self._keep = set(keep)
        self._paths = paths
        self._images: list[DirectImage] = []
        self._exports: list[qemu.QemuNbd] = []
        self._controls: list[NbdClient] = []
        self._added: list[Path] = []

    @property
    def disks(self) -> Sequence[SourceDisk]:
        return self.local_disks

    @property
    def checkpoint(self) -> str | None:
        return self.new_checkpoint

    @property
    def consistency(self) -> str | None:
        return "offline"  # an image file nobody writes while it is read

    async def close(self, success: bool) -> None:
        for image in self._images:
            await image.close()
        for control in self._controls:
            await control.close()
        for export in self._exports:
            await export.stop()
        if success:
            keep = self._keep | {self.new_checkpoint}
            for path in self._paths:
                await remove_bitmaps(path, lambda name: name not in keep)
        else:
            for path in self._added:
                await remove_bitmaps(path, lambda name: name == self.new_checkpoint)


async def remove_bitmaps(path: Path, doomed: Any) -> list[str]:
    """Remove Tessera's bitmaps of ``path`` for which ``doomed(name)`` is true."""
    if not path.exists():
        return []
    info = await qemu.info(path)
    removed = []
    for name in bitmap_flags(info):
        if name.startswith(BITMAP_PREFIX) and doomed(name):
            await qemu.bitmap_remove(path, name)
            removed.append(name)
    return removed


class LocalImageSource:
    """One VM made of local image files (one per disk)."""

    plugin = "local"

    def __init__(self, paths: Sequence[Path], vm_name: str | None = None):
        self.paths = [Path(p).resolve() for p in paths]
        self.vm_name = vm_name or self.paths[0].name
        self.vm_id = (
            image_vm_id(self.paths[0])
            if len(self.paths) == 1
            else "vm-" + hashlib.sha256("|".join(map(str, self.paths)).encode()).hexdigest()[:16]
        )

    async def open(
        self,
        parent_checkpoint: str | None,
        keep_checkpoints: Sequence[str],
        new_checkpoint: str,
        readers: int,
        record: ResourceRecorder,
    ) -> BackupSession:
        plans: list[_Plan] = []
        try:
            for path in self.paths:
                plans.append(await _plan(path, parent_checkpoint))
        except BaseException:
            for plan in plans:
                if plan.image is not None:
                    await plan.image.close()
            raise
        disks_info = [
            DiskInfo(
                disk_id=str(p.path),
                name=p.path.name,
                size=p.size,
                attributes={"format": p.fmt, "path": str(p.path)},
            )
            for p in plans
        ]
        vm = VmInfo(self.vm_id, self.vm_name, tuple(disks_info), config=None)
        qcow2 = [p.path for p in plans if p.fmt == "qcow2"]  # the images that keep bitmaps
        session = LocalSession(vm, new_checkpoint, keep_checkpoints, qcow2)
        session._images = [p.image for p in plans if p.image is not None]
        try:
            for plan, dinfo in zip(plans, disks_info, strict=True):
                if plan.image is not None:
                    session.local_disks.append(RawImageDisk(dinfo, plan.image, plan.reason))
                else:
                    session.local_disks.append(
                        await _serve(session, plan, dinfo, new_checkpoint, readers, record)
                    )
        except BaseException:
            await session.close(success=False)
            raise
        return session


@dataclass
class _Plan:
    """How one image is read: directly (``image``: a raw one) or through qemu-nbd."""

    path: Path
    fmt: str
    size: int
    parent: str | None  # the bitmap an incremental reads from
    reason: str | None  # why an incremental became a full read
    image: DirectImage | None = None


async def _plan(path: Path, parent_checkpoint: str | None) -> _Plan:
    info = await qemu.info(path)
    fmt = str(info["format"])
    flags = bitmap_flags(info)
    parent, reason = None, None
    if parent_checkpoint is not None:
        if fmt != "qcow2":
            reason = f"{fmt} image has no dirty bitmaps: full read"
        elif parent_checkpoint not in flags:
            reason = f"bitmap {parent_checkpoint} is missing: full read"
        elif "in-use" in flags[parent_checkpoint]:
            reason = f"bitmap {parent_checkpoint} is inconsistent (in-use): full read"
        else:
            parent = parent_checkpoint
    plan = _Plan(path, fmt, int(info["virtual-size"]), parent, reason)
    if fmt == "raw":
        plan.image = await DirectImage.open(path, disk=str(path))
        plan.size = plan.image.size  # the file's own: qemu-img rounds up to 512 bytes
    return plan


async def _serve(
    session: LocalSession,
    plan: _Plan,
    dinfo: DiskInfo,
    new_checkpoint: str,
    readers: int,
    record: ResourceRecorder,
) -> LocalSourceDisk:
    """Add the new checkpoint's bitmap (qcow2) and start a read-only qemu-nbd for the image,
    each journaled first."""
    path, parent = plan.path, plan.parent
    if plan.fmt == "qcow2":
        await record("bitmaps_added", [str(p) for p in [*session._added, path]])
        await qemu.bitmap_add(path, new_checkpoint)
        session._added.append(path)
    export = qemu.QemuNbd(path, plan.fmt, read_only=True, bitmap=parent, shared=readers + 2)
    export.prepare()
    session._exports.append(export)
    await record("exports", export_records(session._exports))  # before the process exists
    await export.start()
    await record("exports", export_records(session._exports))  # now with its pid
    contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{parent}"] if parent else [])
    control = await connect(export.address, meta_contexts=contexts)
    session._controls.append(control)
    return LocalSourceDisk(dinfo, export, control, parent, plan.reason)


async def recover(resources: dict[str, Any], committed: bool) -> list[str]:
    """Undo what a killed local backup or restore left: stop its qemu-nbd exports (found by
    their journaled directories) and remove those, remove a partial image, fix up bitmaps."""
    done = await stop_exports(resources.get("exports", []))
    for partial in map(Path, resources.get("partial_images", [])):
        for pid in _qemu_nbd_serving(partial):
            os.kill(pid, signal.SIGKILL)  # its image is being thrown away anyway
            done.append(f"stopped qemu-nbd {pid} serving {partial}")
        if partial.exists():
            partial.unlink()
            done.append(f"removed partial image {partial}")
    new = resources.get("new_checkpoint")
    keep = set(resources.get("keep_checkpoints", [])) | {new}
    for path in map(Path, resources.get("bitmaps_added", [])):
        if committed:
            removed = await remove_bitmaps(path, lambda name: name not in keep)
        else:
            removed = await remove_bitmaps(path, lambda name: name == new)
        done += [f"removed bitmap {name} of {path}" for name in removed]
    return done


def _qemu_nbd_serving(image: Path) -> list[int]:
    """Pids of qemu-nbd processes whose command line names ``image``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"qemu-nbd") and str(image).encode() in argv[1:]:
                pids.append(int(proc.name))
    return pids
