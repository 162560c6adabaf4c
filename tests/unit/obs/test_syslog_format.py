"""RFC 5424 formatting (pure): header fields, structured data and its escaping, severity,
facility, bounds that keep the message parseable."""

import io
import json
import socket
import threading
from collections.abc import Mapping
from datetime import UTC, datetime

import structlog

from engine.config.models import SyslogSection
from engine.obs import log
from engine.obs.syslog import (
    MAX_UDP_MESSAGE,
    SD_ID,
    Facility,
    SyslogForwarder,
    escape_param_value,
    format_message,
    frame_octet_counting,
)
from tests.unit.obs.rfc5424 import parse

NOW = datetime(2026, 11, 28, 13, 10, 21, 123456, tzinfo=UTC)


def fmt(event: Mapping[str, object], **kw: object) -> bytes:
    options: dict[str, object] = {"hostname": "dm01", "procid": "4242", "now": NOW} | kw
    return format_message(event, **options)  # type: ignore[arg-type]


def test_header_fields_and_structured_data() -> None:
    data = fmt({"event": "disk.done", "level": "info", "job": "j1", "vm": "vm01"})
    assert data.startswith(b"<30>1 2026-11-28T13:10:21.123456Z dm01 tessera 4242 disk.done [")
    m = parse(data)
    assert (m.facility, m.severity) == (Facility.DAEMON, 6)
    assert (m.host, m.app, m.procid, m.msgid) == ("dm01", "tessera", "4242", "disk.done")
    assert m.sd == {SD_ID: {"job": "j1", "vm": "vm01"}}
    assert m.msg == "disk.done job=j1 vm=vm01"


def test_severity_from_level_and_facility() -> None:
    expected = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
    for level, severity in expected.items():
        m = parse(fmt({"event": "e", "level": level}, facility=Facility.LOCAL3))
        assert (m.facility, m.severity) == (19, severity), level


def test_escaping_of_quote_backslash_and_bracket() -> None:
    value = 'a "quoted" \\path\\ [x] end]'
    assert escape_param_value(value) == 'a \\"quoted\\" \\\\path\\\\ [x\\] end\\]'
    data = fmt({"event": "e", "level": "info", "error": value})
    assert b'error="a \\"quoted\\" \\\\path\\\\ [x\\] end\\]"' in data
    assert parse(data).sd[SD_ID]["error"] == value


def test_names_and_nil_values() -> None:
    m = parse(fmt({"event": "has space", "level": "info"}))
    assert m.msgid == "-"  # not a valid MSGID: the event is still in MSG
    assert m.sd == {}
    assert m.msg == "has space"
    m = parse(fmt({"event": "e", "level": "info", 'bad key="]': 1, "n": None}))
    assert m.sd[SD_ID] == {"bad_key___": "1"}  # a None value is left out
    m = parse(fmt({"event": "e", "level": "info"}, hostname="host name"))
    assert m.host == "host_name"


def test_non_ascii_values_and_exception_text() -> None:
    m = parse(fmt({"event": "e", "level": "error", "vm": "vé", "exception": "Traceback\n  x"}))
    assert m.sd[SD_ID]["vm"] == "vé"
    assert m.msg == "e vm=vé\nTraceback\n  x"


def test_truncated_at_the_limit_on_a_character_boundary() -> None:
    data = fmt({"event": "e", "level": "info", "text": "é" * 3000}, limit=MAX_UDP_MESSAGE)
    assert len(data) <= MAX_UDP_MESSAGE
    m = parse(data)  # still parses, MSG still valid UTF-8
    assert m.sd == {SD_ID: {"text": "é" * 3000}} or m.sd == {}
    assert m.msg.startswith("e ")


def test_structured_data_shed_when_even_the_header_does_not_fit() -> None:
    event = {"event": "e", "level": "info", "small": "1", "huge": "x" * 5000}
    m = parse(fmt(event, limit=1024))
    assert m.sd == {SD_ID: {"small": "1"}}
    assert len(fmt(event, limit=1024)) <= 1024


def test_octet_counting_frame() -> None:
    assert frame_octet_counting(b"<30>1 x") == b"7 <30>1 x"
    assert frame_octet_counting("é".encode()) == b"2 \xc3\xa9"


def test_processor_passes_the_event_on_and_configure_returns_the_forwarder() -> None:
    section = SyslogSection(host="127.0.0.1", port=9, protocol="udp")
    out = io.StringIO()
    saved = structlog.get_config()
    forwarder = log.configure(level=20, json=True, stream=out, syslog=section)
    try:
        assert isinstance(forwarder, SyslogForwarder)
        when = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
        structlog.get_logger("t").info("hello", vm="vm01", at=when, disks=("a", "b"))
        line = json.loads(out.getvalue())
        assert line["event"] == "hello"
        assert line["vm"] == "vm01"
        assert line["at"] == "2026-11-28T02:00:00+00:00"  # not "datetime.datetime(...)"
        assert line["disks"] == ["a", "b"]
        assert forwarder.flush()
    finally:
        log.configure()  # closes the forwarder
        structlog.configure(**saved)
    assert forwarder.sent + forwarder.dropped == 1


class _Refused(SyslogForwarder):
    """A forwarder whose server always refuses: counts connection attempts."""

    attempts = 0

    def _open(self) -> socket.socket:
        self.attempts += 1
        raise ConnectionRefusedError


def test_reconnection_backs_off_on_the_injected_clock() -> None:
    now = [100.0]
    section = SyslogSection(host="127.0.0.1", port=9, protocol="tcp")
    forwarder = _Refused(section, backoff_initial=1.0, backoff_max=4.0, monotonic=lambda: now[0])
    forwarder.start()
    try:

        def send_at(moment: float) -> int:
            now[0] = moment
            forwarder(None, "info", {"event": "e", "level": "info"})
            assert forwarder.flush()
            return forwarder.attempts

        assert send_at(100.0) == 1  # first attempt at once; next one after 1 s
        assert send_at(100.5) == 1
        assert send_at(101.0) == 2  # then 2 s
        assert send_at(102.9) == 2
        assert send_at(103.0) == 3  # then 4 s, the cap
        assert send_at(107.0) == 4
        assert send_at(110.9) == 4
        assert send_at(111.0) == 5  # still 4 s
    finally:
        forwarder.close()
    assert (forwarder.sent, forwarder.dropped) == (0, 8)


class _Stalled(SyslogForwarder):
    """A server that hangs on connect until released."""

    release = threading.Event()

    def _open(self) -> socket.socket:
        self.release.wait(10)
        raise ConnectionRefusedError


def test_a_stalled_server_never_blocks_the_caller() -> None:
    section = SyslogSection(host="127.0.0.1", port=9, protocol="tcp")
    forwarder = _Stalled(section, queue_depth=2)
    forwarder.start()
    try:
        for _ in range(10):  # returns at once although the sender thread is stuck
            forwarder(None, "info", {"event": "e", "level": "info"})
        assert forwarder.dropped >= 7  # the queue holds 2, the thread at most 1
    finally:
        forwarder.release.set()
        forwarder.close()
    assert forwarder.sent == 0
    assert forwarder.dropped == 10


def test_values_are_json_not_python_reprs() -> None:
    """Lists, mappings, booleans and times arrive as JSON a collector parses; None is left
    out (issue 16: ``['a']``, ``True``, ``None`` and ``datetime(...)`` were sent)."""
    when = datetime(2026, 11, 28, 2, 0, 5, tzinfo=UTC)
    m = parse(
        fmt(
            {
                "event": "policy.fired",
                "level": "info",
                "vms": ["web01", "db01"],
                "summary": {"read": 3, "ok": True},
                "planned": when,
                "seconds": 1.5,
                "error": None,
                "quiesce": False,
            }
        )
    )
    sd = m.sd[SD_ID]
    assert json.loads(sd["vms"]) == ["web01", "db01"]
    assert json.loads(sd["summary"]) == {"read": 3, "ok": True}
    assert sd["planned"] == "2026-11-28T02:00:05+00:00"
    assert (sd["seconds"], sd["quiesce"]) == ("1.5", "false")
    assert "error" not in sd
    assert m.msg == (
        'policy.fired vms=["web01","db01"] summary={"read":3,"ok":true} '
        "planned=2026-11-28T02:00:05+00:00 seconds=1.5 quiesce=false"
    )
