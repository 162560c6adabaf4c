"""Log values as JSON-compatible data: what a log collector can parse, never a Python repr.

``plain`` maps a value to ``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` or
``dict`` (string keys), recursively: times and dates become ISO 8601 strings (an aware time
keeps its offset), a ``timedelta`` its seconds as a number, paths and ``str`` subclasses
plain strings, enums their value, sets sorted lists, bytes hex, an exception
``"TypeName: message"``, anything else ``str(value)``. ``plain_values`` is the structlog
processor that applies it to every field of an event, so the JSON lines for journald and
the syslog structured data carry the same values; ``field_text`` is a value as one
``key=value`` text (strings as they are, everything else as compact JSON).
"""

import enum
import json
from collections import deque
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from pathlib import PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # structlog is imported by engine.obs.log first, rich hidden (issue 15)
    import structlog

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

# structlog's own keys whose values a later processor or renderer interprets itself.
_KEEP = frozenset({"exc_info", "stack_info"})


def plain(value: object) -> JsonValue:  # noqa: PLR0911 — one return per kind of value
    """``value`` as JSON-compatible data (module docstring)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((plain(item) for item in value), key=_sort_key)
    if isinstance(value, list | tuple | deque):
        return [plain(item) for item in value]
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return str(value)


def _sort_key(item: JsonValue) -> str:
    return json.dumps(item, sort_keys=True)


def field_text(value: object) -> str:
    """One field's value as text: a string as it is, anything else as compact JSON."""
    data = plain(value)
    if isinstance(data, str):
        return data
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def plain_values(
    logger: object, method_name: str, event_dict: "structlog.typing.EventDict"
) -> "structlog.typing.EventDict":
    """structlog processor: every field ``plain`` (``exc_info``/``stack_info`` untouched)."""
    return {key: value if key in _KEEP else plain(value) for key, value in event_dict.items()}
