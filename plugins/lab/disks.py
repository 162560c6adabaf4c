"""Generated VM disks for the lab: real ext4 filesystems with deterministic files.

Every disk image is built without mounting anything (no root, no loop devices):

    files (generated from a seed)  ──mke2fs -d──▶  ext4 image of FS_SIZE  ──qemu-img──▶
    qcow2 or raw of the disk's virtual size (the tail beyond the filesystem reads as zeros)

OS disks of several VMs are clones of one *template* filesystem with a few per-VM files
added with ``debugfs -w`` (hostname, machine id, a log), so a backup of the second VM
stores only its differing chunks — the "VMs from one template" case dedup must handle.
Data disks get their own generated files. The same names always give the same files
(mke2fs still draws some metadata at random, e.g. inode generations). A disk of layout
"partitioned" is a guest's disk instead (partitions, XFS, NTFS, LVM: ``guest_disk``).
"""

import asyncio
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.core.errors import EngineError
from engine.core.units import MiB
from plugins.lab.guest_disk import build_guest_disk

FS_SIZE: Final = 128 * MiB  # filesystem part of each image: real data, small enough to be quick
TEMPLATE_DATA: Final = 48 * MiB  # generated files in the template filesystem
DATA_DISK_DATA: Final = 32 * MiB  # generated files in a data disk's filesystem
FIXED_TIME: Final = 1_700_000_000  # file and filesystem times: same bytes on every build
FIXED_UUID: Final = "5e55e7a0-1ab0-4d15-8000-000000000001"


class LabDiskError(EngineError):
    template = "lab disk {path}: {reason}"


@dataclass(frozen=True)
class DiskImage:
    path: Path
    format: str  # qcow2 | raw
    size: int  # virtual size


async def _run(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabDiskError(path=argv[-1], reason=f"{argv[0]} failed: {err.decode().strip()}")


def generate_files(directory: Path, seed: str, total: int) -> None:
    """Deterministic files: text documents (compressible), binaries (not), small configs."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    words = [rng.randbytes(rng.randint(2, 6)).hex() for _ in range(500)]
    written = 0
    i = 0
    directory.mkdir(parents=True, exist_ok=True)
    while written < total:
        kind = rng.random()
        if kind < 0.55:
            data = " ".join(rng.choice(words) for _ in range(rng.randint(500, 30_000))).encode()
            name = f"doc/{i:04d}.txt"
        elif kind < 0.8:
            data = rng.randbytes(rng.randint(64 * 1024, 1024 * 1024))
            name = f"bin/{i:04d}.bin"
        else:
            data = f"[section{i}]\nkey = {rng.random()}\n".encode() * rng.randint(1, 200)
            name = f"etc/{i:04d}.conf"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written += len(data)
        i += 1


async def make_filesystem(raw: Path, files: Path) -> None:
    """An ext4 image of FS_SIZE holding ``files`` (mke2fs -d copies the tree in)."""
    # A fixed UUID, hash seed, clock and file times keep most of the image stable run to run.
    for path in [files, *files.rglob("*")]:
        os.utime(path, (FIXED_TIME, FIXED_TIME))
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-U", FIXED_UUID]
    argv += ["-E", f"hash_seed={FIXED_UUID}", "-d", str(files), str(raw), f"{FS_SIZE // 1024}k"]
    await _run(*argv, env={"E2FSPROGS_FAKE_TIME": str(FIXED_TIME)})


async def add_files(raw: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Write small files into an existing ext4 image with ``debugfs -w`` (no mount)."""
    scratch.mkdir(parents=True, exist_ok=True)
    commands = []
    for name, data in files.items():
        src = scratch / name.replace("/", "_")
        src.write_bytes(data)
        commands.append(f"write {src} {name}")
    script = scratch / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    await _run("debugfs", "-w", "-f", script, raw, env={"E2FSPROGS_FAKE_TIME": str(FIXED_TIME)})


async def finish_image(raw: Path, target: Path, fmt: str, size: int) -> DiskImage:
    """Grow the filesystem image to the disk's virtual size and convert to ``fmt``."""
    if size < FS_SIZE:
        raise LabDiskError(path=target, reason=f"size {size} is below the filesystem's {FS_SIZE}")
    await _run("qemu-img", "resize", "-f", "raw", raw, str(size))
    if fmt == "raw":
        raw.rename(target)
    else:
        await _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, target)
        raw.unlink()
    return DiskImage(target, fmt, size)


@dataclass(frozen=True)
class DiskRequest:
    """One disk to build: ``template`` OS disks share the template filesystem."""

    name: str  # unique; also the generator seed
    path: Path
    format: str
    size: int
    template: bool = False
    vm: str = ""
    layout: str = "ext4"  # or "partitioned" (``plugins.lab.guest_disk``; not from the template)


async def build_disks(requests: Sequence[DiskRequest], work: Path) -> list[DiskImage]:
    """Build every requested image (in order); ``work`` holds temporary files."""
    work.mkdir(parents=True, exist_ok=True)
    template_raw = work / "template.raw"
    if any(r.template for r in requests) and not template_raw.exists():
        generate_files(work / "template-files", "lab-template", TEMPLATE_DATA)
        await make_filesystem(template_raw, work / "template-files")
        shutil.rmtree(work / "template-files")
    images = []
    for request in requests:
        raw = work / f"{request.name}.raw"
        if request.layout == "partitioned":
            await build_guest_disk(raw, request.name, request.size)
        elif request.template:
            shutil.copyfile(template_raw, raw)
            rng = random.Random(request.name)  # noqa: S311 - reproducible test data
            await add_files(
                raw,
                {
                    "hostname": f"{request.vm or request.name}\n".encode(),
                    "machine-id": rng.randbytes(16).hex().encode() + b"\n",
                    "install.log": rng.randbytes(512 * 1024),
                },
                work / f"{request.name}-add",
            )
        else:
            files = work / f"{request.name}-files"
            generate_files(files, request.name, DATA_DISK_DATA)
            await make_filesystem(raw, files)
            shutil.rmtree(files)
        images.append(await finish_image(raw, request.path, request.format, request.size))
    return images
