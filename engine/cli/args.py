"""Value types of ``tessera``'s command-line options: every number and path checked at the edge.

Each function here is an argparse ``type=``: it turns the option's text into the value the
command uses or raises ``argparse.ArgumentTypeError`` (or ValueError), which argparse reports
as a usage error naming the option (exit 2) before any store, daemon or image is touched. A
value that parses is one the command can use: ``--readers 0`` is refused here, not by a
``ValueError`` from the pipeline halfway through a backup.

``absolute_path`` resolves a relative path against the working directory of the command, so
what a job records in its journal still names the same file when the next command (which
runs recovery) starts elsewhere.
"""

import argparse
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from engine.core.units import human_bytes
from engine.store import format as fmt
from engine.store.layout import MIN_PACK_SIZE

if TYPE_CHECKING:
    from engine.config.types import ByteSize

_SIZE: Final = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_ZERO: Final = re.compile(r"0+|(?:0+[wdhms])+")  # a duration of nothing: no grace
MAX_PORT: Final = 65535


def _number(text: str, kind: type[int] | type[float], what: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        value = int(_number(text, int, "an integer"))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"  # argparse names the type in some messages
    return parse


positive_int: Final = int_at_least(1)
non_negative_int: Final = int_at_least(0)


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    value = int(_number(text, int, "a port"))
    if not 1 <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port {value} is not within 1..{MAX_PORT}")
    return value


def non_negative_seconds(text: str) -> float:
    """A number of seconds ≥ 0 (0: do not wait); finite."""
    value = float(_number(text, float, "a number of seconds"))
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} seconds must be 0 or more and finite")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = float(_number(text, float, "a number"))
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 and finite")
    return value


def ratio(text: str) -> float:
    """A share within 0..1 (the GC repack threshold)."""
    value = float(_number(text, float, "a ratio"))
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"threshold {text!r} is not within 0..1")
    return value


def percent(text: str) -> float:
    """A percentage within (0, 100]; a trailing ``%`` is allowed."""
    value = float(_number(text.rstrip("%"), float, "a percentage"))
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"percentage {text!r} must be in (0, 100]")
    return value


def size(text: str) -> int:
    """``65536``, ``64k``, ``1M``, ``1MiB``, ``64MB`` (all binary multiples) → bytes, ≥ 1."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1M, 64MiB, 65536)")
    exponent = " kmgt".index(m.group(2).lower() or " ")
    value = int(m.group(1)) * (1 << (10 * exponent))
    if value < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least 1 byte")
    return value


def chunk_size(text: str) -> int:
    """A store's chunk size: a power of two within the format's limits."""
    value = size(text)
    if not fmt.MIN_CHUNK_SIZE <= value <= fmt.MAX_CHUNK_SIZE or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"chunk size {text!r} must be a power of two between "
            f"{human_bytes(fmt.MIN_CHUNK_SIZE)} and {human_bytes(fmt.MAX_CHUNK_SIZE)}"
        )
    return value


def pack_size(text: str) -> int:
    """A store's pack size, at least ``MIN_PACK_SIZE``."""
    value = size(text)
    if value < MIN_PACK_SIZE:
        raise argparse.ArgumentTypeError(
            f"pack size {text!r} must be at least {human_bytes(MIN_PACK_SIZE)}"
        )
    return value


def s3_url(text: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` → (bucket, prefix ending in "/" or empty)."""
    if not text.startswith("s3://"):
        raise argparse.ArgumentTypeError(f"{text!r} is not s3://BUCKET[/PREFIX]")
    bucket, _, prefix = text.removeprefix("s3://").partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise argparse.ArgumentTypeError(f"{bucket!r} is not an S3 bucket name")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def http_url(text: str) -> str:
    """An http(s) endpoint URL."""
    if not re.fullmatch(r"https?://[^\s/]+(:\d+)?/?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not http(s)://HOST[:PORT]")
    return text.rstrip("/")


def byte_rate(text: str) -> "ByteSize":
    """Bytes per second, ≥ 1 (``50MiB``)."""
    # Here, not at the top: the configuration types (msgspec, calendars) load only when this
    # option is given; building the parser does not need them (issue 15).
    from engine.config.types import ByteSize  # noqa: PLC0415

    try:
        return ByteSize(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def grace(text: str) -> timedelta:
    """A GC grace period, written as the configuration's ``gc_grace`` is (``7d``, ``12h``,
    ``90m``, ``1s``, ``1d12h``: ``m`` is minutes), or zero (``0``, ``0h``: no grace)."""
    from engine.config.types import Duration  # noqa: PLC0415 - as in byte_rate

    if _ZERO.fullmatch(text.strip().lower()):
        return timedelta(0)
    try:
        return Duration(text).delta
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def absolute_path(text: str) -> Path:
    """The path made absolute against the current directory (symlinks are kept as named)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(os.path.abspath(text))
