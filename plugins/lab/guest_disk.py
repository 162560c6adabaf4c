"""A lab disk laid out the way a guest's disk is: an MBR partition table with ext4, XFS and
NTFS partitions and an LVM physical volume whose volume ``vg0/lv0`` holds ext4, each with
deterministic files. ``DiskSeed(layout="partitioned")`` asks for one; ``engine.restore.files``
(``tessera files``, ``tessera mount``) is what reads it back.

::

    guest_files(name) ──► {"/sda1/etc/hostname": bytes, …}   (the same bytes for the same name)
    python -m plugins.lab.guest_disk RAW NAME SIZE ──► a sparse raw image of SIZE bytes

    /dev/sda1   ext4   64 MiB    /etc/hostname, /etc/name-link → hostname, /data/random.bin
    /dev/sda2   xfs   320 MiB    /srv/www/index.html, /srv/www/big.bin  (xfsprogs: ≥ 300 MiB)
    /dev/sda3   ntfs   64 MiB    /Users/doc.txt
    /dev/sda4   LVM    the rest  vg0/lv0 (64 MiB ext4): /var/log/app.log

libguestfs builds it in an appliance VM, so no root, no loop device and no host LVM are
needed (the host never sees the guest's volume group). It runs in a process of its own: its
Python calls keep the GIL for as long as the appliance works, which would stop the lab's event
loop. Where KVM cannot boot a guest (nested set-ups), ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``
in the environment makes it emulate (~30 s instead of ~3 s).
"""

import asyncio
import random
import sys
import tempfile
from pathlib import Path
from typing import Final

from engine.core.units import MiB
from engine.io import guestfs as guestfs_bindings

MIN_SIZE: Final = 600 * MiB  # the partitions below, and a 1 MiB gap before the first
SECTOR: Final = 512
# (first MiB, end MiB) of sda1..sda3; sda4 runs from 449 MiB to 1 MiB before the end
PARTITIONS: Final = ((1, 65), (65, 385), (385, 449))
FILESYSTEMS: Final = {  # tree name → (device, mkfs type)
    "sda1": ("/dev/sda1", "ext4"),
    "sda2": ("/dev/sda2", "xfs"),
    "sda3": ("/dev/sda3", "ntfs"),
    "vg0-lv0": ("/dev/vg0/lv0", "ext4"),
}
LINK: Final = ("/sda1/etc/name-link", "hostname")  # a symlink, and where it points


class GuestDiskError(Exception):
    """The builder failed; its text says how."""


def guest_files(name: str) -> dict[str, bytes]:
    """The files of disk ``name``, by their path in ``tessera files``' tree: random bytes
    larger than a chunk (incompressible), text (compressible), small files."""
    rng = random.Random(name)  # noqa: S311 - reproducible test data, not secrets
    return {
        "/sda1/etc/hostname": f"{name}\n".encode(),
        "/sda1/data/random.bin": rng.randbytes(3 * MiB) + b"tail",
        "/sda2/srv/www/index.html": f"<h1>{name} on xfs</h1>\n".encode(),
        "/sda2/srv/www/big.bin": rng.randbytes(5 * MiB),
        "/sda3/Users/doc.txt": f"ntfs document of {name}\r\n".encode() * 1000,
        "/vg0-lv0/var/log/app.log": b"".join(
            f"{i} lvm line {rng.random()}\n".encode() for i in range(20_000)
        ),
    }


def build(raw: Path, name: str, size: int) -> None:
    """Write the disk of ``name`` to ``raw`` (a new sparse file of ``size`` bytes)."""
    if size < MIN_SIZE:
        raise GuestDiskError(f"{raw}: {size} bytes is below the layout's {MIN_SIZE}")
    guestfs = guestfs_bindings.load()
    with raw.open("wb") as f:
        f.truncate(size)
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    try:
        g.add_drive_opts(str(raw), format="raw", readonly=False)
        g.launch()
        g.part_init("/dev/sda", "mbr")
        per_mib = MiB // SECTOR
        for start, end in PARTITIONS:
            g.part_add("/dev/sda", "p", start * per_mib, end * per_mib - 1)
        g.part_add("/dev/sda", "p", PARTITIONS[-1][1] * per_mib, -per_mib)
        g.pvcreate("/dev/sda4")
        g.vgcreate("vg0", ["/dev/sda4"])
        g.lvcreate("lv0", "vg0", 64)
        for device, fstype in FILESYSTEMS.values():
            g.mkfs(fstype, device)
        files = guest_files(name)
        with tempfile.TemporaryDirectory(prefix="tessera-guest-disk-") as scratch:
            upload = Path(scratch) / "upload"
            for tree_name, (device, _) in FILESYSTEMS.items():
                g.mount(device, "/")
                for path, data in files.items():
                    fs, _, inner = path.lstrip("/").partition("/")
                    if fs == tree_name:
                        g.mkdir_p(str(Path("/" + inner).parent))
                        upload.write_bytes(data)
                        g.upload(str(upload), "/" + inner)
                link, target = LINK
                if link.startswith(f"/{tree_name}/"):
                    g.ln_s(target, link.removeprefix(f"/{tree_name}"))
                g.umount("/")
        g.shutdown()
    finally:
        g.close()


async def build_guest_disk(raw: Path, name: str, size: int) -> None:
    """``build`` in a process of its own (see the module docstring); GuestDiskError with
    its error output when it fails."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "plugins.lab.guest_disk",
        str(raw),
        name,
        str(size),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise GuestDiskError(f"{raw}: building the guest layout failed: {err.decode().strip()}")


if __name__ == "__main__":
    build(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
