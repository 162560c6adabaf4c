"""Value types that configuration fields parse into, and the msgspec hooks that build them.

``Duration`` and ``Schedule`` are ``str`` subclasses: the model keeps the text the operator
wrote (what ``show-config`` prints, what other modules may take as a plain string) and the
parsed value beside it (``.delta``, ``.calendar``). Constructors raise ``ValueError`` with
the reason, which the loader reports with file, key path and line.
"""

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from engine.core.errors import ConfigError
from engine.sched.calendar import Calendar, parse

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

_DURATION = re.compile(r"(\d+)([wdhms])")
_DURATION_WHOLE = re.compile(r"(?:\d+[wdhms])+")
_UNIT = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class Duration(str):
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s`` or sums such as ``1d12h``; positive."""

    delta: timedelta

    def __new__(cls, text: str) -> Self:
        spec = text.strip().lower()
        if not _DURATION_WHOLE.fullmatch(spec):
            raise ValueError(
                f"not a duration: {text!r} (a number and a unit w, d, h, m or s: 30d, 12h, 1d12h)"
            )
        seconds = sum(int(n) * _UNIT[u] for n, u in _DURATION.findall(spec))
        if seconds == 0:
            raise ValueError(f"duration {text!r} must be longer than zero")
        self = super().__new__(cls, spec)
        self.delta = timedelta(seconds=seconds)
        return self


class Schedule(str):
    """One calendar expression (see ``engine.sched.calendar``), checked when loaded."""

    calendar: Calendar

    def __new__(cls, text: str) -> Self:
        try:
            calendar = parse(text)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self = super().__new__(cls, calendar.text)
        self.calendar = calendar
        return self


class ByteSize(int):
    """A byte count: ``65536``, ``64k``, ``100MiB``, ``1G`` (binary multiples)."""

    def __new__(cls, value: int | str) -> Self:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"size {value} must be at least 1 byte")
            return super().__new__(cls, value)
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"not a size: {value!r} (examples: 1M, 64MiB, 65536)")
        exponent = " kmgt".index(m.group(2).lower() or " ")
        return cls(int(m.group(1)) * (1 << (10 * exponent)))


def dec_hook(kind: type, obj: Any) -> Any:
    """msgspec decode hook for Path, Duration, Schedule, ByteSize and ZoneInfo fields."""
    if kind is Path and isinstance(obj, str):
        return Path(obj)
    if kind in (Duration, Schedule) and isinstance(obj, str):
        return kind(obj)
    if kind is ByteSize and isinstance(obj, int | str) and not isinstance(obj, bool):
        return ByteSize(obj)
    if kind is ZoneInfo and isinstance(obj, str):
        try:
            return ZoneInfo(obj)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {obj!r} (examples: UTC, Europe/Berlin)") from None
    names: dict[type, str] = {Duration: "a duration such as 30d", Schedule: "a schedule"}
    what = names.get(kind, kind.__name__)
    raise TypeError(f"expected {what}, got {type(obj).__name__}")


def enc_hook(obj: Any) -> Any:
    """msgspec encode hook: paths and zones as their text (for ``show-config``)."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, ZoneInfo):
        return obj.key
    if isinstance(obj, Duration | Schedule):
        return str(obj)
    if isinstance(obj, ByteSize):
        return int(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
