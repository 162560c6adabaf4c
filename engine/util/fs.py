"""Durable file operations: the only place Tessera publishes files.

The publish order is always: write a temporary file in the target directory, fsync it,
rename it over the final name, fsync the directory. A crash at any point leaves either the
old state or the new one, never a torn file. Temporary files end in ``.tmp`` so that
recovery on open can find and delete them.
"""

import contextlib
import errno
import os
from pathlib import Path

from engine.util import failpoints

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path, failpoint: str | None = None) -> None:
    """fsync a directory so that renames and creations inside it are durable.

    ``failpoint`` (e.g. ``store.pack.before_dir_fsync``) is hit first: fault tests make it
    raise, as a failing fsync would."""
    if failpoint is not None:
        failpoints.hit(failpoint)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview, failpoint: str | None = None) -> None:
    """Write every byte of ``data`` at the file position of ``fd``.

    With a failpoint name and a failpoint handler installed, the write is split in two and the
    failpoint is hit between the halves, so crash tests can kill a writer mid-write.
    """
    view = memoryview(data)
    if failpoint is not None and failpoint and failpoints.active() and len(view) > 1:
        half = len(view) // 2
        _write_fully(fd, view[:half])
        failpoints.hit(failpoint)
        view = view[half:]
    _write_fully(fd, view)


def _write_fully(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        if written == 0:  # POSIX allows it on a full device; looping would never end
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def pwrite_all(
    fd: int, data: bytes | bytearray | memoryview, offset: int, failpoint: str | None = None
) -> None:
    """Write every byte of ``data`` at ``offset`` without moving the file position.

    A short ``pwrite`` is continued, not ignored (a lost tail would read back as zeros). A
    write that fails part-way raises ``OSError`` with some bytes written: callers that keep
    the file must treat the range as garbage. With a failpoint, the write is split in two and
    the failpoint hit between the halves (crash and fault tests: a torn write).
    """
    view = memoryview(data)
    if failpoint is not None and failpoints.active() and len(view) > 1:
        half = len(view) // 2
        _pwrite_fully(fd, view[:half], offset)
        failpoints.hit(failpoint)
        view, offset = view[half:], offset + half
    _pwrite_fully(fd, view, offset)


def _pwrite_fully(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[written:], offset + written


def atomic_write(path: Path, data: bytes, failpoint_prefix: str = "fs.atomic") -> None:
    """Publish ``data`` at ``path`` durably (tmp + fsync + rename + fsync dir).

    Failpoints ``<prefix>.mid_write``, ``.before_fsync``, ``.before_rename``,
    ``.after_rename``, ``.before_dir_fsync`` mark the crash and fault windows. A failure
    before the rename removes the temporary file and leaves ``path`` as it was; a failure
    of the final directory fsync leaves the new file in place but not known durable (the
    caller must not report it as committed).
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, data, failpoint=f"{failpoint_prefix}.mid_write")
            failpoints.hit(f"{failpoint_prefix}.before_fsync")
            os.fsync(fd)
        finally:
            os.close(fd)
        failpoints.hit(f"{failpoint_prefix}.before_rename")
        os.replace(tmp, path)
    except BaseException:
        # A failed write (a full disk) must not leave a torn temp file behind until the next
        # open: remove it now. Best effort — recovery removes ``*.tmp`` files anyway.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    failpoints.hit(f"{failpoint_prefix}.after_rename")
    fsync_dir(path.parent, f"{failpoint_prefix}.before_dir_fsync")


def remove_tmp_files(root: Path) -> list[Path]:
    """Delete every ``*.tmp`` file under ``root``; returns what was removed."""
    removed = []
    for tmp in root.rglob("*" + TMP_SUFFIX):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed
