"""The store's SQLite files (``index.db``, ``catalog.db``): caches, so damage is survivable.

Both are rebuilt from the truth — the index from the packs, the catalog from the manifests —
so a missing or damaged file costs time, never data. What happens to them::

    file          missing                         not a database (garbage, damaged)
    ──────────    ────────────────────────────    ─────────────────────────────────────
    writable      created and rebuilt by open      moved aside to ``<name>.damaged-<time>``
    open          (= recover), reported once       (evidence is never deleted), then as
                                                   missing
    read-only     a temporary copy is built from   the same; the file is left as it is
    open          the truth beside the store's     (verify reports it, exit 3)
                  process (``tempfile``)

The index also holds what verify and GC learnt (``bad_chunks``, condemned stamps): a rebuilt
index forgets them, which is safe (verify finds the damage again; a chunk no longer condemned
is merely kept longer).

Errors. SQLite reports a full disk as ``sqlite3.OperationalError('database or disk is
full')`` and damage as ``DatabaseError``; ``sqlite_errors`` turns either into a
``StoreError`` naming the file and the condition (``SQLITE_FULL``, ``ENOSPC``), and
``os_error`` does the same for an ``OSError``, so no caller shows a traceback.
"""

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from engine.core.errors import StoreError
from engine.util.fs import fsync_dir

MISSING: Final = "is missing"
_SIDE_FILES: Final = ("-wal", "-shm")  # SQLite's WAL and shared-memory index beside a db
_DAMAGE: Final = {"SQLITE_NOTADB", "SQLITE_CORRUPT"}


def connect_ro(path: Path) -> tuple[sqlite3.Connection, str | None]:
    """A read-only connection to ``path``; (connection, note). A WAL database read-only
    still needs its shared-memory file, which a full disk cannot grow
    (``SQLITE_IOERR_SHMSIZE``): when that fails and no WAL file is there (so no writer has
    uncommitted pages), the file is opened ``immutable`` instead and the note says so."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as e:
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise
        conn.close()
        conn = sqlite3.connect(
            f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False
        )
        return conn, f"{path.name} opened immutable ({describe(e, path)})"
    return conn, None


def problem(path: Path) -> str | None:
    """Why ``path`` is not a usable SQLite database (``MISSING`` or the damage), or None.
    Cheap: reads the schema page only (``quick_check`` is verify's, not every open's)."""
    if not path.exists():
        return MISSING
    try:
        conn, _ = connect_ro(path)
        conn.close()
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorname", None) in _DAMAGE or (
            isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)
        ):
            return f"is not a database ({e})"
        raise StoreError(path=path, reason=describe(e, path)) from e
    return None


def quick_check(path: Path) -> str | None:
    """SQLite's ``PRAGMA quick_check`` of ``path`` (every page read): None when it is whole,
    else what it says (or why it could not run)."""
    try:
        conn, _ = connect_ro(path)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return describe(e)
    return None if rows == ["ok"] else "; ".join(map(str, rows))


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL and shared-memory files) to
    ``<name>.damaged-<UTC time>``; returns the new path of the database file."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", *_SIDE_FILES):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, target.with_name(target.name + suffix))
    fsync_dir(path.parent)
    return target


def drop_orphans(path: Path) -> list[Path]:
    """A missing database's leftover WAL / shared-memory files belong to the lost file and
    must not be replayed into a new one: moved aside like damage. Returns what moved."""
    moved = []
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            target = side.with_name(side.name + ".orphan")
            os.rename(side, target)
            moved.append(target)
    if moved:
        fsync_dir(path.parent)
    return moved


_LOW_SPACE: Final = 64 * 1024  # less free than this: SQLite's I/O errors are a full disk


def describe(e: sqlite3.Error, path: Path | None = None) -> str:
    """The SQLite error with its condition name; a full disk says ``ENOSPC`` (SQLite may
    report it as SQLITE_FULL or, growing its shared-memory file, as an I/O error)."""
    name = getattr(e, "sqlite_errorname", None) or type(e).__name__
    enospc = f"no space left on device, {errno.errorcode[errno.ENOSPC]}"
    if name == "SQLITE_FULL":
        return f"{e} ({name}: {enospc})"
    if path is not None and name.startswith("SQLITE_IOERR"):
        try:
            st = os.statvfs(path.parent)
        except OSError:
            return f"{e} ({name})"
        if st.f_bavail * st.f_frsize < _LOW_SPACE:
            return f"{e} ({name}: {enospc})"
    return f"{e} ({name})"


def os_reason(e: OSError) -> str:
    code = errno.errorcode.get(e.errno or 0, str(e.errno))
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where} [{code}]"


@contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """Turn an ``sqlite3.Error`` raised in the block into a ``StoreError`` naming ``path``."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(path=path, reason=describe(e, path)) from e


@contextmanager
def os_errors(root: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into a ``StoreError`` naming the store and
    the errno (a full disk is ``ENOSPC``)."""
    try:
        yield
    except OSError as e:
        raise StoreError(path=root, reason=os_reason(e)) from e
