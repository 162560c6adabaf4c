"""A local qcow2 or raw image as a backup Source, served by a read-only ``qemu-nbd``.

Checkpoints are qcow2 persistent dirty bitmaps named ``tessera-<job>``::

    run N:  check parent bitmap ──▶ add bitmap N (records writes from now on)
            ──▶ qemu-nbd --read-only [-B parent] ──▶ read (all, or dirty since parent)
            ──▶ success: stop, remove bitmaps other than N and the kept ones (last full's)
                failure: stop, remove bitmap N (the parent stays valid for the next run)

The image must not be written by anyone else while it is exported (qemu's image locking
refuses it anyway). A raw image has no bitmaps: every run reads it fully (``fallback_reason``
says so). A bitmap that is missing, or flagged ``in-use`` (not saved cleanly after a crash:
its contents cannot be trusted), makes that disk a full read with the reason recorded.

Journal keys (each written before what it names exists): ``bitmaps_added``,
``new_checkpoint``/``keep_checkpoints``, ``exports`` (each qemu-nbd's private directory,
and its pid once started; ``export_records``) and, from the restore target,
``partial_images``. ``recover`` stops exports found by their directories (``stop_exports``),
removes partial images and fixes bitmaps; every step is idempotent.
"""

import hashlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from engine.core.extent import Extent
from engine.io import qemu
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


class LocalSession:
    def __init__(self, vm: VmInfo, new_checkpoint: str, keep: Sequence[str], paths: list[Path]):
        self.vm = vm
        self.new_checkpoint = new_checkpoint
        self.local_disks: list[LocalSourceDisk] = []
        self._keep = set(keep)
        self._paths = paths
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
        return "offline"  # an image file nobody writes while it is exported

    async def close(self, success: bool) -> None:
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
        disks_info = []
        plans: list[tuple[Path, str, str | None, str | None]] = []
        for path in self.paths:
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
            plans.append((path, fmt, parent, reason))
            disks_info.append(
                DiskInfo(
                    disk_id=str(path),
                    name=path.name,
                    size=int(info["virtual-size"]),
                    attributes={"format": fmt, "path": str(path)},
                )
            )
        vm = VmInfo(self.vm_id, self.vm_name, tuple(disks_info), config=None)
        session = LocalSession(vm, new_checkpoint, keep_checkpoints, self.paths)
        try:
            for (path, fmt, parent, reason), dinfo in zip(plans, disks_info, strict=True):
                if fmt == "qcow2":
                    await record("bitmaps_added", [str(p) for p in [*session._added, path]])
                    await qemu.bitmap_add(path, new_checkpoint)
                    session._added.append(path)
                export = qemu.QemuNbd(path, fmt, read_only=True, bitmap=parent, shared=readers + 2)
                export.prepare()
                session._exports.append(export)
                await record(
                    "exports", export_records(session._exports)
                )  # before the process exists
                await export.start()
                await record("exports", export_records(session._exports))  # now with its pid
                contexts = ["base:allocation"] + ([f"qemu:dirty-bitmap:{parent}"] if parent else [])
                control = await connect(export.address, meta_contexts=contexts)
                session._controls.append(control)
                session.local_disks.append(LocalSourceDisk(dinfo, export, control, parent, reason))
        except BaseException:
            await session.close(success=False)
            raise
        return session


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
