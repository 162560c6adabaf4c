"""RFC 5424 forwarding of structlog events to a central syslog server (UDP, TCP or TLS).

::

    log.info("disk.done", job="j1", vm="vm01")          (any thread, the event loop included)
        │  SyslogForwarder.__call__  (a structlog processor: formats, never blocks)
        ▼
    bounded queue ── full: dropped += 1
        │
        ▼  one daemon thread "tessera-syslog"
    connect (backoff while the server is down: dropped += 1) ── send ── error: close, retry later

One line per event::

    <30>1 2026-11-28T13:10:21.123456Z dm01 tessera 4242 disk.done [tessera@32473 job="j1"
    vm="vm01"] BOM disk.done job=j1 vm=vm01

PRI is ``facility * 8 + severity`` (severity from the log level); MSGID is the event name
when it is a valid MSGID; the structured data element carries the event's context keys
(values escaped per RFC 5424 §6.3.3); MSG (UTF-8, BOM first) repeats them as ``key=value``
for servers that do not show structured data. Values are written as
``engine.obs.values.field_text`` gives them: strings as they are, numbers, booleans, lists
and mappings as compact JSON, times ISO 8601; a field whose value is None is left out.
UDP sends one datagram per message (RFC 5426), TCP and TLS (RFC 5425) frame with octet
counting (``LEN SP MSG``, RFC 6587 §3.4.1). Messages over the transport's bound are cut at
a character boundary, dropping structured-data parameters first if even the header does
not fit, so what arrives always parses.

Logging never fails or stalls a backup: a server that is down or slow costs dropped
messages, counted in ``dropped``, never an exception or a wait on the caller's side.
"""

import contextlib
import enum
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from engine.obs.values import field_text

# Documentation private enterprise number (RFC 5612): the SD-ID ``tessera@32473``.
SD_ID = "tessera@32473"
APP_NAME = "tessera"
# Messages waiting for the sender thread: at ~300 bytes each about 3 MiB, minutes of
# ordinary logging; beyond it a server that cannot keep up costs messages, not memory.
QUEUE_DEPTH = 10_000
# RFC 5426 §3.2: receivers SHOULD take 2048 octets; larger datagrams risk truncation by the
# receiver or loss to IP fragmentation.
MAX_UDP_MESSAGE = 2048
# RFC 5425 §4.3.1: receivers SHOULD take 8192 octets; a traceback longer than that is cut.
MAX_STREAM_MESSAGE = 8192
CONNECT_TIMEOUT = 5.0  # seconds; a server that does not answer is "down"
SEND_TIMEOUT = 5.0  # a stalled server blocks only the sender thread, and only this long
BACKOFF_INITIAL = 0.5  # seconds before the first reconnection attempt, doubled each failure
BACKOFF_MAX = 30.0

_BOM = "\ufeff".encode()
_NOT_CONTEXT = frozenset(
    {"event", "level", "timestamp", "exc_info", "exception", "stack", "stack_info"}
)


class Facility(enum.IntEnum):
    KERN = 0
    USER = 1
    MAIL = 2
    DAEMON = 3
    AUTH = 4
    SYSLOG = 5
    LPR = 6
    NEWS = 7
    UUCP = 8
    CRON = 9
    AUTHPRIV = 10
    FTP = 11
    LOCAL0 = 16
    LOCAL1 = 17
    LOCAL2 = 18
    LOCAL3 = 19
    LOCAL4 = 20
    LOCAL5 = 21
    LOCAL6 = 22
    LOCAL7 = 23


SEVERITY = {  # structlog level name → RFC 5424 severity
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}


class SyslogSettings(Protocol):
    """What the forwarder needs; ``engine.config.models.SyslogSection`` is one (obs sits
    below config in the layers, so it names the shape, not the class)."""

    @property
    def host(self) -> str: ...
    @property
    def protocol(self) -> str: ...  # "udp" | "tcp" | "tls"
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def effective_port(self) -> int: ...


# --- formatting (pure) ---------------------------------------------------------------------


def escape_param_value(value: str) -> str:
    """RFC 5424 §6.3.3: ``"``, ``\\`` and ``]`` are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(text: str, limit: int, banned: str = "") -> str:
    """PRINTUSASCII without ``banned``, at most ``limit`` characters; "-" if nothing is left."""
    kept = "".join(c if 33 <= ord(c) <= 126 and c not in banned else "_" for c in text)
    return kept[:limit] or "-"


def _param_name(key: str) -> str:
    return _printable(key, 32, banned='= ]"')


def _msgid(event: str) -> str:
    if 0 < len(event) <= 32 and all(33 <= ord(c) <= 126 for c in event):
        return event
    return "-"


def _structured_data(params: list[tuple[str, str]]) -> str:
    if not params:
        return "-"
    body = "".join(f' {name}="{escape_param_value(value)}"' for name, value in params)
    return f"[{SD_ID}{body}]"


def format_message(
    event_dict: Mapping[str, Any],
    *,
    facility: int = Facility.DAEMON,
    hostname: str = "-",
    app_name: str = APP_NAME,
    procid: str = "-",
    now: datetime | None = None,
    limit: int = MAX_STREAM_MESSAGE,
) -> bytes:
    """One RFC 5424 message (without transport framing) of at most ``limit`` bytes."""
    level = str(event_dict.get("level", "info")).lower()
    severity = SEVERITY.get(level, 6)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
    event = str(event_dict.get("event", ""))
    params = [
        (_param_name(str(key)), field_text(value))
        for key, value in event_dict.items()
        if key not in _NOT_CONTEXT and value is not None
    ]
    text = " ".join([event, *(f"{name}={value}" for name, value in params)])
    if isinstance(event_dict.get("exception"), str):
        text += "\n" + event_dict["exception"]
    header = (
        f"<{facility * 8 + severity}>1 {stamp.replace('+00:00', 'Z')} "
        f"{_printable(hostname, 255)} {_printable(app_name, 48)} {_printable(procid, 128)} "
        f"{_msgid(event)} "
    ).encode("ascii")
    while True:
        head = header + _structured_data(params).encode() + b" " + _BOM
        if len(head) <= limit or not params:
            break
        params.pop()  # even without MSG it does not fit: shed parameters from the end
    return _truncate(head + text.encode(), limit)


def _truncate(message: bytes, limit: int) -> bytes:
    """Cut at ``limit`` bytes without splitting a UTF-8 sequence."""
    if len(message) <= limit:
        return message
    cut = limit
    while cut > 0 and (message[cut] & 0xC0) == 0x80:  # a continuation byte: back up
        cut -= 1
    return message[:cut]


def frame_octet_counting(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 / RFC 5425 §4.3: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


# --- transport -----------------------------------------------------------------------------


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class SyslogForwarder:
    """A structlog processor that forwards each event to a syslog server and passes the
    event on unchanged. ``start()`` starts the sender thread; ``close()`` stops it after
    sending what is queued (bounded by ``timeout``). Counters: ``sent``, ``dropped``."""

    def __init__(
        self,
        settings: SyslogSettings,
        *,
        facility: int = Facility.DAEMON,
        hostname: str | None = None,
        app_name: str = APP_NAME,
        queue_depth: int = QUEUE_DEPTH,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.protocol not in ("udp", "tcp", "tls"):
            raise ValueError(f"syslog protocol {settings.protocol!r}: udp, tcp or tls")
        self.host = settings.host
        self.port = settings.effective_port
        self.protocol = settings.protocol
        self.ca_file = settings.ca_file
        self.facility = int(facility)
        self.hostname = hostname or socket.gethostname()
        self.app_name = app_name
        self.limit = MAX_UDP_MESSAGE if self.protocol == "udp" else MAX_STREAM_MESSAGE
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_depth)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff = backoff_initial
        self._monotonic = monotonic
        self._next_attempt = 0.0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()  # the counters, bumped from callers and the thread

    # structlog processor
    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if os.getpid() != self._pid or self._thread is None:
            return event_dict  # a forked worker or a closed forwarder: the thread is not here
        fields = dict(event_dict)
        fields.setdefault("level", method_name)
        message = format_message(
            fields,
            facility=self.facility,
            hostname=self.hostname,
            app_name=self.app_name,
            procid=str(self._pid),
            limit=self.limit,
        )
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._count_drop()
        return event_dict

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tessera-syslog", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call was sent or dropped."""
        if self._thread is None:
            return True
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), stop the thread, close."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        thread.join(timeout)

    def _count_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                if isinstance(item, _Flush):
                    item.done.set()
                    continue
                assert isinstance(item, bytes)
                self._deliver(item)
        finally:
            self._disconnect()

    def _deliver(self, message: bytes) -> None:
        sock = self._sock if self._sock is not None and self._alive(self._sock) else None
        if sock is None:
            self._disconnect()
            sock = self._connect()
        if sock is None:
            self._count_drop()
            return
        try:
            if self.protocol == "udp":
                sock.send(message)
            else:
                sock.sendall(frame_octet_counting(message))
        except OSError:
            self._disconnect()
            self._fail()
            self._count_drop()
            return
        with self._lock:
            self.sent += 1

    def _connect(self) -> socket.socket | None:
        if self._monotonic() < self._next_attempt:
            return None
        try:
            sock = self._open()
        except OSError:  # ssl.SSLError and certificate errors included
            self._fail()
            return None
        self._sock = sock
        self._backoff = self._backoff_initial
        return sock

    def _open(self) -> socket.socket:
        if self.protocol == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.connect(address)  # errors from ICMP port-unreachable reach send()
            except OSError:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        try:
            if self.protocol == "tls":
                context = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file is not None else None
                )
                sock = context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(SEND_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        """A syslog server never writes to us: a readable stream socket means the server
        closed it (TCP sends into a closed connection succeed once, silently lost). TLS 1.3
        session tickets also make it readable: reading them yields no data."""
        if self.protocol == "udp":
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return True
            sock.setblocking(False)
            try:
                return sock.recv(1) != b""
            finally:
                sock.settimeout(SEND_TIMEOUT)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except (OSError, ValueError):
            return False

    def _fail(self) -> None:
        self._next_attempt = self._monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
