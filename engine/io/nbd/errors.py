"""What the NBD layer raises, and which of it a retry loop may retry.

::

    NbdError (EngineError)
    ├── NbdProtocolError         the server broke the protocol (bad magic, unknown cookie,
    │                            a reply that does not fit its request); the connection is dead
    ├── NbdOptionError           the server refused an option during the handshake
    │                            (unknown export, TLS required, ...)
    ├── NbdConnectionError       connecting failed, timed out, or the connection was lost
    │   (also TransientError)    with requests in flight; retry on a *new* connection
    └── NbdRequestError          the server answered one request with an error; the
        │                        connection stays usable
        └── NbdTransientRequestError  (also TransientError) EIO, ENOMEM, ESHUTDOWN

Why a subclass for the retryable request errors instead of an instance flag:
``EngineError.retryable`` is a class attribute that retry loops (``util/retry``) read, and they
catch ``TransientError``; a second class keeps both working without special cases, while
``except NbdRequestError`` still catches every server error reply. ``request_error()`` picks
the class from the errno. EIO is retryable because on shared storage it is most often a path
failover or a storage domain hiccup; ENOMEM is a server resource shortage; ESHUTDOWN means the
server is going away, so a retry needs a new connection (the client refuses further requests
once it has seen it). EPERM, EINVAL, ENOSPC, EOVERFLOW and ENOTSUP repeat on every retry.
"""

from typing import Final

from engine.core.errors import EngineError, TransientError

# Error values of the NBD protocol (proto.md "Error values"); the numbers are Linux errnos.
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

ERRNO_NAMES: Final = {
    EPERM: "EPERM",
    EIO: "EIO",
    ENOMEM: "ENOMEM",
    EINVAL: "EINVAL",
    ENOSPC: "ENOSPC",
    EOVERFLOW: "EOVERFLOW",
    ENOTSUP: "ENOTSUP",
    ESHUTDOWN: "ESHUTDOWN",
}

TRANSIENT_ERRNOS: Final = frozenset({EIO, ENOMEM, ESHUTDOWN})


def errno_name(errno: int) -> str:
    """``EIO`` for 5; unknown values (which the spec says to treat as EINVAL) as ``errno 42``."""
    return ERRNO_NAMES.get(errno, f"errno {errno}")


class NbdError(EngineError):
    template = "NBD: {reason}"


class NbdProtocolError(NbdError):
    """The server sent something the protocol does not allow; nothing more can be read."""

    template = "NBD protocol error: {reason}"


class NbdOptionError(NbdError):
    """The server refused a handshake option with an error reply."""

    template = "NBD server refused {option} for export {export!r}: {reply}{detail}"


class NbdConnectionError(NbdError, TransientError):
    """No connection, or it broke; requests in flight on it are lost."""

    template = "NBD server {server}: {reason}"


class NbdRequestError(NbdError):
    """The server failed one request; ``errno`` and ``error`` (its name) say how."""

    template = "NBD {command} offset={offset} length={length} failed on {server}: {error}{detail}"

    @property
    def errno(self) -> int:
        value = self.fields["errno"]
        assert isinstance(value, int)
        return value


class NbdTransientRequestError(NbdRequestError, TransientError):
    """A request error that may succeed when retried (see the module docstring)."""


def request_error(
    *,
    server: str,
    command: str,
    offset: int,
    length: int,
    errno: int,
    message: str = "",
    error_offset: int | None = None,
) -> NbdRequestError:
    """Build the NbdRequestError (or its transient subclass) for a server error reply."""
    parts = []
    if message:
        parts.append(message)
    if error_offset is not None:
        parts.append(f"at offset {error_offset}")
    detail = f" ({', '.join(parts)})" if parts else ""
    cls = NbdTransientRequestError if errno in TRANSIENT_ERRNOS else NbdRequestError
    return cls(
        server=server,
        command=command,
        offset=offset,
        length=length,
        errno=errno,
        error=errno_name(errno),
        detail=detail,
    )
