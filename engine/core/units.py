"""Byte units. Sizes in Tessera are ints of bytes; these names make literals readable.

What Tessera shows people — the command line, job summaries, logs, mails — writes sizes and
rates in binary units with one formatter each: ``human_bytes`` (``1.5 GiB``) and
``human_rate`` (``183.2 MiB/s``). Machine output (``--json``, the API) carries plain bytes
and seconds. Sizes people type (``--chunk-size 1M``, ``bandwidth_limit: 50MiB``) are binary
multiples too.
"""

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB


def human_bytes(n: float) -> str:
    """Render a byte count for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    """Render a rate for people in the units of ``human_bytes``: ``183.2 MiB/s``."""
    return f"{human_bytes(bytes_per_second)}/s"
