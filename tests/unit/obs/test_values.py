"""Log values as JSON-compatible data (``engine.obs.values``): no Python reprs reach a log
collector."""

import enum
import json
from collections import deque
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from engine.config.types import ByteSize, Duration
from engine.obs.values import field_text, plain, plain_values


class Color(enum.Enum):
    RED = "red"


def test_plain_maps_every_kind_to_json_data() -> None:
    when = datetime(2026, 11, 28, 2, 0, 5, tzinfo=UTC)
    value = {
        "when": when,
        "day": date(2026, 11, 28),
        "took": timedelta(minutes=1, seconds=30),
        "path": Path("/var/lib/tessera"),
        "size": ByteSize("1MiB"),
        "keep": Duration("30d"),
        "color": Color.RED,
        "set": {"b", "a"},
        "tuple": ("x", 1),
        "deque": deque([1, 2]),
        "bytes": b"\x01\xff",
        "error": ValueError("bad"),
        "nested": {1: [when]},
        "flag": True,
        "none": None,
        "other": object.__new__(type("Thing", (), {"__str__": lambda self: "thing"})),
    }
    expected = {
        "when": "2026-11-28T02:00:05+00:00",
        "day": "2026-11-28",
        "took": 90.0,
        "path": "/var/lib/tessera",
        "size": 1048576,
        "keep": "30d",
        "color": "red",
        "set": ["a", "b"],
        "tuple": ["x", 1],
        "deque": [1, 2],
        "bytes": "01ff",
        "error": "ValueError: bad",
        "nested": {"1": ["2026-11-28T02:00:05+00:00"]},
        "flag": True,
        "none": None,
        "other": "thing",
    }
    result = plain(value)
    assert result == expected
    assert json.loads(json.dumps(result)) == expected  # it is JSON as it stands
    assert type(plain(ByteSize("1MiB"))) is int and type(plain(Duration("1h"))) is str


def test_field_text_and_the_processor() -> None:
    assert field_text("web01") == "web01"
    assert field_text(["a", 1, None]) == '["a",1,null]'
    assert field_text(False) == "false"
    assert field_text(2.5) == "2.5"
    info = (ValueError, ValueError("x"), None)
    out = plain_values(None, "info", {"event": "e", "vms": ("a",), "exc_info": info})
    assert out == {"event": "e", "vms": ["a"], "exc_info": info}  # exc_info left to structlog
