"""A guest disk image for the file-level restore tests, made by libguestfs itself (the real
tools, not ours): an MBR partition table with the filesystems an admin's VMs hold — ext4,
XFS, NTFS, and an ext4 volume of an LVM volume group — holding the files a test names, and a
symlink ``/sda1/etc/name-link`` → ``hostname``. Used by ``tests/integration/test_files.py``
(the CLI) and ``tests/e2e/test_daemon_files.py`` (the daemon's API).

The builder's appliance runs emulated (``force_tcg`` set on its handle): this machine's KVM
is nested and hangs booting a Linux guest.
"""

import os
from pathlib import Path

from engine.io import guestfs as guestfs_bindings

MIB_SECTORS = 2048


def lab_files() -> dict[str, bytes]:
    """Tree path → content: files larger than a chunk, nested directories, every filesystem."""
    return {
        "/sda1/etc/hostname": b"files-lab\n",
        "/sda1/data/random.bin": os.urandom(3 << 20) + b"tail",
        "/sda2/srv/www/big.bin": os.urandom(5 << 20),
        "/sda2/srv/www/index.html": b"<h1>xfs</h1>\n",
        "/sda3/Users/doc.txt": b"ntfs document\r\n" * 1000,
        "/vg0-lv0/var/log/app.log": b"lvm line\n" * 50_000,
    }


def make_disk(image: Path, files: dict[str, bytes], scratch: Path) -> None:
    """A 600 MiB sparse raw disk: sda1 ext4, sda2 XFS, sda3 NTFS, sda4 an LVM PV holding
    vg0/lv0 (ext4); ``files`` ("/sda1/etc/hostname" → bytes) written into them."""
    guestfs = guestfs_bindings.load()
    with image.open("wb") as f:
        f.truncate(600 << 20)
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    try:
        g.set_backend_settings(["force_tcg"])  # as ENV says for the CLI
        g.add_drive_opts(str(image), format="raw", readonly=False)
        g.launch()
        g.part_init("/dev/sda", "mbr")
        for start, end in ((1, 65), (65, 385), (385, 449)):
            g.part_add("/dev/sda", "p", start * MIB_SECTORS, end * MIB_SECTORS - 1)
        g.part_add("/dev/sda", "p", 449 * MIB_SECTORS, -MIB_SECTORS)
        g.mkfs("ext4", "/dev/sda1")
        g.mkfs("xfs", "/dev/sda2")
        g.mkfs("ntfs", "/dev/sda3")
        g.pvcreate("/dev/sda4")
        g.vgcreate("vg0", ["/dev/sda4"])
        g.lvcreate("lv0", "vg0", 64)
        g.mkfs("ext4", "/dev/vg0/lv0")
        devices = {"sda1": "/dev/sda1", "sda2": "/dev/sda2", "sda3": "/dev/sda3"}
        devices["vg0-lv0"] = "/dev/vg0/lv0"
        for name, device in devices.items():
            g.mount(device, "/")
            for path, data in files.items():
                fs, _, inner = path.lstrip("/").partition("/")
                if fs != name:
                    continue
                g.mkdir_p(str(Path("/" + inner).parent))
                local = scratch / "upload"
                local.write_bytes(data)
                g.upload(str(local), "/" + inner)
            if name == "sda1":
                g.ln_s("hostname", "/etc/name-link")
            g.umount("/")
        g.shutdown()
    finally:
        g.close()
