"""Failpoints: named places where crash tests may stop the process.

Production code calls ``hit("store.pack.before_rename")`` at every point where a crash must
leave the store consistent. With no handler installed (always, outside tests) a hit is one
global lookup. Crash tests install a handler in a writer subprocess that SIGKILLs itself at
the N-th hit of a chosen name, then reopen the store and check what survived.

``active()`` lets hot paths do extra work (splitting a write in two, to crash mid-write) only
when a test asked for it.
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
