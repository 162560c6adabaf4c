"""structlog setup. Nothing is configured at import time; entry points call ``configure``.

The CLI logs ``key=value`` lines to stderr at WARNING (INFO with ``-v``) so stdout stays
for results; the daemon (service issue) will log JSON to stdout for journald.
"""

import logging
import sys
from typing import TextIO

import structlog


def configure(
    level: int = logging.WARNING, json: bool = False, stream: TextIO | None = None
) -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
