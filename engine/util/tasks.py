"""Structured concurrency helpers.

``run_group(start)`` runs the tasks ``start`` creates in one ``asyncio.TaskGroup`` and, when
they fail, raises the first failure *as itself* (not wrapped in an ExceptionGroup), so
errors keep their identity (disk, offset, chunk…) for the job record and the exit code. The
other failures are attached as notes.
"""

import asyncio
from collections.abc import Callable


async def run_group(start: Callable[[asyncio.TaskGroup], object]) -> None:
    try:
        async with asyncio.TaskGroup() as tg:
            start(tg)
    except BaseExceptionGroup as group:
        first, *others = leaves(group)
        for other in others:
            first.add_note(f"also failed meanwhile: {other!r}")
        raise first from None


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
