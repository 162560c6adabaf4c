"""A guest disk image made by libguestfs itself (the real tools, not ours), for the tests of
the file-level restore and restore verification (``tests/integration/test_files.py``,
``test_check.py``): an MBR partition table with ext4, XFS, NTFS and an LVM volume group
holding an ext4 volume, files written into them; and a way to damage its ext4 filesystem
that a mount does not notice but ``e2fsck`` does."""

import struct
from pathlib import Path

from engine.io import guestfs as guestfs_bindings

MIB_SECTORS = 2048
SDA1_OFFSET = 1 << 20  # the first partition starts at 1 MiB (make_disk)


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


def zero_ext4_block_bitmap(image: Path, offset: int = SDA1_OFFSET) -> int:
    """Overwrite the block bitmap of block group 0 of the ext4 filesystem at ``offset`` of
    ``image`` with zeros (every block free, the group's checksum wrong): the filesystem still
    mounts, and ``e2fsck -n`` reports block bitmap differences. Returns the bitmap's offset
    in the image."""
    with image.open("r+b") as f:
        f.seek(offset + 1024)  # the superblock
        sb = f.read(1024)
        assert struct.unpack_from("<H", sb, 0x38)[0] == 0xEF53, "not an ext2/3/4 superblock"
        first_data_block, log_block_size = struct.unpack_from("<II", sb, 0x14)
        block = 1024 << log_block_size
        f.seek(offset + (first_data_block + 1) * block)  # the group descriptors follow it
        (bitmap_block,) = struct.unpack_from("<I", f.read(32), 0)  # bg_block_bitmap_lo
        where = offset + bitmap_block * block
        f.seek(where)
        f.write(bytes(block))
    return where
