"""Failpoints: named places where crash and fault tests stop or fail the process.

Production code calls ``hit("store.pack.before_rename")`` at every point where a crash must
leave the store consistent, and before every write, fsync, rename and SQLite commit a fault
must be survivable (names end in ``mid_write``, ``before_fsync``, ``before_rename``,
``before_dir_fsync``, ``before_commit``…). With no handler installed (always, outside tests)
a hit is one global lookup. Crash tests install a handler that SIGKILLs the process at the
N-th hit of a chosen name; fault tests (``tests/faults``) one that raises the ``OSError`` or
``sqlite3`` error the operation would, then check what survived.

``active()`` lets hot paths do extra work (splitting a write in two, to crash or fail
mid-write: a torn write) only when a test asked for it.
"""

from collections.abc import Callable

_handler: Callable[[str], None] | None = None


def install(handler: Callable[[str], None] | None) -> None:
    """Install (or with None remove) the process-wide failpoint handler."""
    global _handler
    _handler = handler


def active() -> bool:
    return _handler is not None


def hit(name: str) -> None:
    handler = _handler
    if handler is not None:
        handler(name)
