"""structlog setup. Nothing is configured at import time; entry points call ``configure``.

The CLI logs ``key=value`` lines to stderr at WARNING (INFO with ``-v``) so stdout stays
for results; the daemon logs JSON to stdout for journald and may also forward every event
to a central syslog server (``engine.obs.syslog``). Every field is made JSON-compatible
first (``engine.obs.values.plain_values``: times ISO 8601, numbers numbers, no Python
reprs), so journald's JSON and syslog's structured data carry values a collector parses.
"""

import logging
import sys
from typing import TYPE_CHECKING, TextIO

from engine.obs.values import plain_values  # imports no structlog at run time

# Importing structlog imports rich when rich is installed — its console, traceback and
# pretty-printing modules, ~50 ms — for the default exception formatter of structlog's
# console renderer; ``configure`` formats tracebacks plainly and never uses it. So that a
# command does not pay for it at every start (issue 15), structlog is imported with rich
# hidden: a None in ``sys.modules`` makes ``import rich`` fail, which structlog takes as rich
# not being installed. rich stays importable afterwards (the CLI's progress bars use it on a
# terminal). This holds when this module is the first to import structlog, as in
# ``engine.cli.main``; imported after structlog, it changes nothing.
_hide_rich = "structlog" not in sys.modules and "rich" not in sys.modules
if _hide_rich:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _hide_rich:
        del sys.modules["rich"]

if TYPE_CHECKING:
    from engine.obs.syslog import SyslogForwarder, SyslogSettings

_forwarder: "SyslogForwarder | None" = None  # the one the last ``configure`` started


def _current_stderr(*args: object) -> structlog.PrintLogger:
    """A logger on whatever ``sys.stderr`` is *now* (loggers are not cached): a stream
    captured at configure time may be closed later (a test's capture, a redirected CLI)."""
    return structlog.PrintLogger(sys.stderr)


def configure(
    level: int = logging.WARNING,
    json: bool = False,
    stream: TextIO | None = None,
    syslog: "SyslogSettings | None" = None,
    *,
    facility: int | None = None,
) -> "SyslogForwarder | None":
    """Configure structlog for the whole process. With ``syslog`` (a
    ``config.models.SyslogSection``), events at ``level`` and above are also forwarded in
    RFC 5424 form (as ``facility``, by default the daemon's); the started forwarder is
    returned so the caller can read its counters and ``close()`` it at shutdown. A forwarder
    from an earlier call is closed first."""
    global _forwarder
    if _forwarder is not None:
        _forwarder.close()
        _forwarder = None
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    processors: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        plain_values,
    ]
    if syslog is not None:
        # Here, not at the top: the forwarder (sockets, TLS, its thread) loads only when
        # forwarding is configured, which no command but the daemon does (issue 15).
        from engine.obs.syslog import Facility, SyslogForwarder  # noqa: PLC0415

        _forwarder = SyslogForwarder(
            syslog, facility=Facility.DAEMON if facility is None else facility
        )
        _forwarder.start()
        processors.append(_forwarder)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream) if stream else _current_stderr,
        cache_logger_on_first_use=False,
    )
    return _forwarder
