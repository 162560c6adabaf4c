"""Checking a guest filesystem inside the appliance, without writing to it: what the helper
(``engine.restore.appliance``) runs for a ``check`` request.

Each filesystem type is checked by its own checker in its no-write mode::

    ext2/3/4  e2fsck -f -n        exit 0 clean; 4 errors left uncorrected; 8 operational error
    xfs       xfs_repair -n       exit 0 clean; 1 corruption found; 2 a log to replay
    ntfs      ntfsfix --no-action exit 0 clean; else what it could not process
    vfat      fsck.fat -n         exit 0 clean; 1 errors found; 2 cannot check
    btrfs     btrfs check --readonly   exit 0 clean; else errors found

Others (and a checker the appliance lacks) are *unchecked*: mounted and listed only.

Why ``debug sh`` and not libguestfs's checker calls: the stable API has no no-write form of
e2fsck (``e2fsck(correct=True)`` is ``-p``, ``forceall`` is ``-y``, neither refuses to run
without a terminal) nor of ntfsfix, and ``xfs_repair(nomodify=True)`` keeps only the exit
status, not what was found. ``debug sh`` runs a command of the appliance itself (no guest
root needed), and every command here is a no-write one. Writes could not reach the backup
anyway — the drives are read-only NBD exports under qemu's throwaway overlay — but a checker
that repaired the overlay would hide what it found.

A filesystem is checked unmounted, after the launch mounted it: the mount replayed its
journal or log into the overlay, so it is checked as the guest would see it after its own
recovery (``xfs_repair -n`` refuses a dirty log; ``e2fsck -n`` skips the replay and reports
what the journal would fix). It is mounted read-only again afterwards, for the expected
paths and any later request.
"""

import shlex
from typing import Any, Final

from engine.restore.tree import Filesystem, FsCheck, PathCheck, kind_of

# fstype → the checker's command line, in no-write mode
CHECKERS: Final[dict[str, tuple[str, ...]]] = {
    "ext2": ("e2fsck", "-f", "-n"),
    "ext3": ("e2fsck", "-f", "-n"),
    "ext4": ("e2fsck", "-f", "-n"),
    "xfs": ("xfs_repair", "-n"),
    "ntfs": ("ntfsfix", "--no-action"),
    "vfat": ("fsck.fat", "-n"),
    "btrfs": ("btrfs", "check", "--readonly"),
}
# e2fsck's exit status is a sum of these (e2fsck(8))
E2FSCK_BITS: Final = {
    1: "errors corrected",
    2: "errors corrected, reboot needed",
    4: "filesystem errors left uncorrected",
    8: "operational error",
    16: "usage or syntax error",
    32: "cancelled",
    128: "shared library error",
}
MEANINGS: Final[dict[str, dict[int, str]]] = {
    "xfs_repair": {1: "corruption found", 2: "the log needs replaying (dirty log)"},
    "fsck.fat": {1: "errors found", 2: "the filesystem could not be checked"},
}
NOT_FOUND: Final = 127  # the shell's status for a command it cannot find
OUTPUT_TAIL: Final = 16384  # bytes of a checker's output kept (a damaged fs can print MBs)
OUTPUT_LINES: Final = 40  # lines of it kept in the result
STATUS_MARK: Final = "tessera-check-status="
BY_ID: Final = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_hd"  # udev's link to drive <index>


def check(g: Any, fs: Filesystem) -> FsCheck:
    """Check ``fs`` (as the launch found it, mounted at /<name> or not) with its checker in
    no-write mode; it is mounted read-only again afterwards when it was before."""
    argv = CHECKERS.get(fs.fstype)
    if argv is None:
        return _result(fs, "unchecked", problem=f"no checker for {fs.fstype}")
    mountpoint = f"/{fs.name}"
    if fs.mounted:
        try:
            g.umount(mountpoint)
        except RuntimeError as e:  # never checked mounted: a checker would see it change
            return _result(fs, "failed", problem=f"cannot unmount it for the check: {e}")
    try:
        status, output = _run(g, list(argv), _kernel_path(g, fs.device))
    finally:
        remount = _remount(g, fs, mountpoint)
    return _verdict(fs, argv, status, output, remount)


def _verdict(
    fs: Filesystem, argv: tuple[str, ...], status: int, output: str, remount: str
) -> FsCheck:
    checker = " ".join(argv)
    if status == NOT_FOUND:
        return _result(fs, "unchecked", checker, status, f"{argv[0]} is not in the appliance")
    if status != 0:
        meaning = _meaning(argv[0], status)
        return _result(fs, "failed", checker, status, f"{checker}: {meaning}", _tail(output))
    if not fs.mounted:  # the checker passed it, the kernel did not
        return _result(fs, "failed", checker, status, f"does not mount: {fs.problem}")
    if remount:
        return _result(fs, "failed", checker, status, f"does not mount again: {remount}")
    return _result(fs, "ok", checker, status)


def lookup(g: Any, path: str) -> PathCheck:
    """Whether the tree path ``path`` (``/sda1/etc/hostname``) exists; a link counts as
    itself, not its target."""
    try:
        mode = g.lstatns(path)["st_mode"]
    except RuntimeError as e:
        return PathCheck(path, False, problem=str(e).strip())
    return PathCheck(path, True, kind=kind_of(mode))


def _kernel_path(g: Any, device: str) -> str:
    """A path of the appliance's kernel for libguestfs's ``device``.

    libguestfs names the disks in the order they were added (/dev/sda, /dev/sdb …) and
    translates those names in every call; the kernel names them in the order it found them,
    which can differ (the appliance's own disk found first: the first disk is then
    /dev/sdb). ``debug sh`` gets no translation, so a disk or partition is named by the link
    udev makes from the drive's index (``scsi-0QEMU_QEMU_HARDDISK_hd<index>[-part<n>]``);
    a logical volume's /dev/VG/LV is the kernel's own name."""
    if device in g.list_partitions():
        index = g.device_index(g.part_to_dev(device))
        return f"{BY_ID}{index}-part{g.part_to_partnum(device)}"
    if device in g.list_devices():
        return f"{BY_ID}{g.device_index(device)}"
    return device


def _run(g: Any, argv: list[str], device: str) -> tuple[int, str]:
    """Run ``argv`` on ``device`` (a path of the appliance's kernel, a link resolved first)
    in the appliance; its exit status and the tail of its output."""
    command = f'{shlex.join(argv)} "$(readlink -f {shlex.quote(device)})" </dev/null'
    script = f"{{ {command}; echo {STATUS_MARK}$?; }} 2>&1 | tail -c {OUTPUT_TAIL}"
    text: str = g.debug("sh", [script])
    body, _, last = text.rstrip("\n").rpartition(STATUS_MARK)
    try:
        return int(last.strip()), body
    except ValueError:  # the mark cut off: cannot happen with tail on our own last line
        return -1, text


def _remount(g: Any, fs: Filesystem, mountpoint: str) -> str:
    """Mount ``fs`` read-only again if it was; the error's text, or empty."""
    if not fs.mounted:
        return ""
    try:
        g.mount_ro(fs.device, mountpoint)
    except RuntimeError as e:
        return str(e).strip()
    return ""


def _meaning(tool: str, status: int) -> str:
    if tool == "e2fsck":
        parts = [text for bit, text in E2FSCK_BITS.items() if status & bit]
        return f"exit {status} ({', '.join(parts) or 'unknown status'})"
    return f"exit {status} ({MEANINGS.get(tool, {}).get(status, 'problems found')})"


def _tail(output: str) -> str:
    return "\n".join(output.strip().splitlines()[-OUTPUT_LINES:])


def _result(
    fs: Filesystem,
    state: str,
    checker: str = "",
    status: int | None = None,
    problem: str = "",
    output: str = "",
) -> FsCheck:
    return FsCheck(fs.name, fs.device, fs.fstype, fs.disk, state, checker, status, problem, output)
