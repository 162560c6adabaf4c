"""Run the top-level coroutine of a command on uvloop.

uvloop's transports and callbacks are C; on the backup path the event loop thread (NBD reads,
futures of the CPU pool, store writes) then costs less CPU that the codec threads can use.
The daemon and every CLI command enter asyncio through ``run``.
"""

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a uvloop event loop."""
    return uvloop.run(main)
