"""What the file-level restore's two processes exchange (``engine.restore.files`` and its
helper ``engine.restore.appliance``): a guest filesystem, a directory entry, and what a
check of a restore point found (``FsCheck``, ``PathCheck``)."""

import stat
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


@dataclass(frozen=True, slots=True)
class FsCheck:
    """One filesystem checked by ``check``: its checker's verdict in no-write mode."""

    name: str  # as in Filesystem
    device: str
    fstype: str
    disk: str
    state: str  # ok | failed | unchecked (no checker for its type in the appliance)
    checker: str = ""  # the command run: "e2fsck -f -n", "xfs_repair -n" …
    exit_status: int | None = None
    problem: str = ""  # what is wrong, one line; empty when ok
    output: str = ""  # the checker's last lines (bounded), kept for a failed check


@dataclass(frozen=True, slots=True)
class PathCheck:
    """One expected path of ``check``: there or not."""

    path: str
    present: bool
    kind: str = ""  # file, dir, link, other
    problem: str = ""  # why it is missing, as the appliance said


def kind_of(mode: int) -> str:
    """An ``Entry``'s kind from its ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"
