"""What the file-level restore's two processes exchange (``engine.restore.files`` and its
helper ``engine.restore.appliance``): a guest filesystem and a directory entry."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Filesystem:
    """One guest filesystem: its directory in the tree, device, type and disk."""

    name: str  # the directory under the tree's root: sda1, vg0-lv0
    device: str  # as the appliance names it: /dev/sda1, /dev/vg0/lv0
    fstype: str
    disk: str  # the manifest disk it is on (for LVM: its first physical volume's disk)
    mounted: bool
    problem: str = ""  # why it is not mounted


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry of ``ls``."""

    name: str
    kind: str  # file, dir, link, other
    size: int
    mode: int
    mtime: int
    target: str = ""  # a link's
