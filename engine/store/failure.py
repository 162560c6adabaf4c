"""Write failures of the store, turned into errors an operator can act on.

A failed ``write``/``fsync``/``rename`` or SQLite commit is never shown as a bare ``OSError``
or ``sqlite3.OperationalError``: ``write_failure`` names the store, what was being written
(pack, DiskMap, manifest, index, catalog), the errno, and for a full disk how much space the
write needed and how much the filesystem has free. SQLite reports a full disk as
``SQLITE_FULL`` ("database or disk is full") and an I/O error as ``SQLITE_IOERR``; both are
mapped to the matching errno so callers handle one kind of failure.
"""

import errno
import os
import sqlite3
from pathlib import Path

from engine.core.errors import StoreWriteError
from engine.core.units import human_bytes

_SQLITE_ERRNO = {
    "database or disk is full": errno.ENOSPC,
    "disk i/o error": errno.EIO,
}


def failure_errno(error: BaseException) -> int | None:
    """The errno of an I/O failure (OSError or SQLite), or None if it is not one."""
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, sqlite3.Error):
        text = str(error).lower()
        for needle, code in _SQLITE_ERRNO.items():
            if needle in text:
                return code
    return None


def is_write_failure(error: BaseException) -> bool:
    return isinstance(error, OSError | sqlite3.Error)


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_failure(
    root: Path, what: str, error: BaseException, needed: int | None = None
) -> StoreWriteError:
    """A ``StoreWriteError`` for ``error`` raised while writing ``what`` in store ``root``."""
    code = failure_errno(error)
    name = errno.errorcode.get(code, "") if code is not None else ""
    detail = str(error) if not isinstance(error, OSError) else (error.strerror or str(error))
    reason = f"{detail} ({name})" if name else detail
    if code == errno.ENOSPC:
        free = free_bytes(root)
        parts = []
        if needed is not None:
            parts.append(f"needed {human_bytes(needed)} more")
        if free is not None:
            parts.append(f"{human_bytes(free)} free on its filesystem")
        reason += "; " + ", ".join(parts) if parts else ""
        reason += "; free space (prune + gc, or a larger filesystem) and run the job again"
    elif code == errno.EIO:
        reason += "; the device reported an I/O error: check the disk (dmesg) before trusting it"
    return StoreWriteError(path=root, what=what, reason=reason)
