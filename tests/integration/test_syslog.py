"""Syslog forwarding to real receivers on 127.0.0.1 (UDP socket, TCP server, TLS server):
messages arrive in RFC 5424 form; a server that is down costs counted drops, never an
exception; delivery resumes when it is back."""

import contextlib
import io
import queue
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from engine.config.models import SyslogSection
from engine.obs import log
from engine.obs.syslog import SD_ID, Facility, SyslogForwarder
from tests.integration.selfsigned import make_cert
from tests.unit.obs.rfc5424 import Parsed, parse

pytestmark = pytest.mark.integration

WAIT = 10.0  # seconds a receiver waits for a message before the test fails (not a timing check)
RUNNING: list["StreamReceiver"] = []


@pytest.fixture(autouse=True)
def _stop_receivers() -> Iterator[None]:
    yield
    while RUNNING:
        RUNNING.pop().stop()


class StreamReceiver:
    """A syslog server over TCP (or TLS): octet-counted frames into ``messages``."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        RUNNING.append(self)

    def _serve(self) -> None:
        conns: dict[socket.socket, bytearray] = {}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([self.listener, *conns], [], [], 0.05)
                for sock in readable:
                    if sock is self.listener:
                        conn, _ = self.listener.accept()
                        conn.settimeout(WAIT)
                        if self.tls is not None:
                            try:
                                conn = self.tls.wrap_socket(conn, server_side=True)
                            except OSError:
                                conn.close()
                                continue
                        conns[conn] = bytearray()
                        continue
                    if not self._read(sock, conns[sock]):
                        del conns[sock]
                        sock.close()
        finally:
            for conn in conns:
                conn.close()
            self.listener.close()

    def _read(self, sock: socket.socket, buf: bytearray) -> bool:
        try:
            data = sock.recv(65536)
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                data += sock.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        buf += data
        while b" " in buf:
            length, _, rest = bytes(buf).partition(b" ")
            if len(rest) < int(length):
                break
            self.messages.put(rest[: int(length)])
            del buf[: len(length) + 1 + int(length)]
        return True

    def stop(self) -> None:
        """Close the connections and the listener (idempotent)."""
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def forwarding(protocol: str, port: int, ca_file: Path | None = None) -> Iterator[SyslogForwarder]:
    section = SyslogSection(host="127.0.0.1", port=port, protocol=protocol, ca_file=ca_file)  # type: ignore[arg-type]
    forwarder = SyslogForwarder(section, hostname="dm01", backoff_initial=0.01, backoff_max=0.05)
    forwarder.start()
    try:
        yield forwarder
    finally:
        forwarder.close()


def emit(forwarder: SyslogForwarder, event: str, **kw: object) -> None:
    forwarder(None, "info", {"event": event, "level": "info", **kw})


def check_line(message: bytes, event: str, **context: str) -> Parsed:
    m = parse(message)
    assert m.facility == Facility.DAEMON
    assert m.severity == 6
    assert m.timestamp.endswith("Z")
    assert (m.host, m.app, m.msgid) == ("dm01", "tessera", event)
    assert m.procid.isdigit()
    assert m.sd == ({SD_ID: context} if context else {})
    return m


def drops_until(forwarder: SyslogForwarder, event: str) -> None:
    """Emit while the server is down until a drop is counted (no exception escapes)."""
    for _ in range(1000):
        emit(forwarder, event)
        assert forwarder.flush(WAIT)
        if forwarder.dropped:
            return
    pytest.fail("no drop counted while the server was down")


def resumes(forwarder: SyslogForwarder, messages: "queue.Queue[bytes]") -> bytes:
    """Emit until one message arrives (messages sent before the reconnection are lost)."""
    for _ in range(2000):
        emit(forwarder, "back", n="1")
        assert forwarder.flush(WAIT)
        with contextlib.suppress(queue.Empty):
            return messages.get(timeout=0.01)
    pytest.fail("delivery did not resume")


# --- UDP -------------------------------------------------------------------------------------


@pytest.fixture
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    yield sock
    sock.close()


def test_udp_one_datagram_per_message(udp_socket: socket.socket) -> None:
    port = udp_socket.getsockname()[1]
    with forwarding("udp", port) as forwarder:
        emit(forwarder, "job.done", job="j1", vm="vm01")
        emit(forwarder, "esc", error='say "hi" \\ [x]')
        emit(forwarder, "big", text="é" * 5000)
        first, second, big = (udp_socket.recv(65536) for _ in range(3))
    check_line(first, "job.done", job="j1", vm="vm01")
    assert check_line(second, "esc", error='say "hi" \\ [x]').msg == 'esc error=say "hi" \\ [x]'
    assert len(big) <= 2048
    assert parse(big).msg.startswith("big text=éé")
    assert forwarder.sent == 3
    assert forwarder.dropped == 0


def test_udp_server_down_then_back(udp_socket: socket.socket) -> None:
    port = udp_socket.getsockname()[1]
    udp_socket.close()  # nobody listens: ICMP port unreachable fails the next send
    with forwarding("udp", port) as forwarder:
        drops_until(forwarder, "lost")
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with back:
            back.bind(("127.0.0.1", port))
            got: queue.Queue[bytes] = queue.Queue()
            back.settimeout(0.01)
            for _ in range(2000):
                emit(forwarder, "back", n="1")
                assert forwarder.flush(WAIT)
                with contextlib.suppress(TimeoutError):
                    got.put(back.recv(65536))
                    break
            check_line(got.get_nowait(), "back", n="1")


# --- TCP and TLS -----------------------------------------------------------------------------


def test_tcp_octet_counting() -> None:
    receiver = StreamReceiver()
    try:
        with forwarding("tcp", receiver.port) as forwarder:
            emit(forwarder, "job.done", job="j1", vm="vm01")
            emit(forwarder, "multi", text='line1\nline2 ] "q" \\')
            first = receiver.messages.get(timeout=WAIT)
            second = receiver.messages.get(timeout=WAIT)
    finally:
        receiver.stop()
    check_line(first, "job.done", job="j1", vm="vm01")
    m = check_line(second, "multi", text='line1\nline2 ] "q" \\')
    assert m.msg == 'multi text=line1\nline2 ] "q" \\'


def test_tcp_server_down_no_exception_then_delivery_resumes() -> None:
    receiver = StreamReceiver()
    port = receiver.port
    with forwarding("tcp", port) as forwarder:
        emit(forwarder, "first")
        check_line(receiver.messages.get(timeout=WAIT), "first")
        receiver.stop()  # the server goes away, connection and listener
        drops_until(forwarder, "lost")
        receiver = StreamReceiver(port=port)
        try:
            check_line(resumes(forwarder, receiver.messages), "back", n="1")
        finally:
            receiver.stop()
    assert forwarder.dropped >= 1


def test_tls_with_ca_file(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    receiver = StreamReceiver(tls=cert.server_context())
    try:
        with forwarding("tls", receiver.port, ca_file=cert.cert) as forwarder:
            emit(forwarder, "job.done", job="j1", vm='v"m]')
            emit(forwarder, "second")
            first = receiver.messages.get(timeout=WAIT)
            second = receiver.messages.get(timeout=WAIT)
    finally:
        receiver.stop()
    check_line(first, "job.done", job="j1", vm='v"m]')
    check_line(second, "second")


def test_tls_untrusted_server_is_dropped_not_raised(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_cert(tmp_path / "other")
    receiver = StreamReceiver(tls=cert.server_context())
    try:
        with forwarding("tls", receiver.port, ca_file=other.cert) as forwarder:
            drops_until(forwarder, "untrusted")
            assert forwarder.sent == 0
    finally:
        receiver.stop()
    assert receiver.messages.empty()


def test_tls_server_restart_resumes(tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    receiver = StreamReceiver(tls=cert.server_context())
    port = receiver.port
    with forwarding("tls", port, ca_file=cert.cert) as forwarder:
        emit(forwarder, "first")
        check_line(receiver.messages.get(timeout=WAIT), "first")
        receiver.stop()
        drops_until(forwarder, "lost")
        receiver = StreamReceiver(port=port, tls=cert.server_context())
        try:
            check_line(resumes(forwarder, receiver.messages), "back", n="1")
        finally:
            receiver.stop()


def test_through_structlog_configure() -> None:
    receiver = StreamReceiver()
    try:
        section = SyslogSection(host="127.0.0.1", port=receiver.port, protocol="tcp")
        saved = structlog.get_config()
        forwarder = log.configure(level=20, json=True, stream=io.StringIO(), syslog=section)
        assert forwarder is not None
        try:
            logger = structlog.get_logger("t")
            logger.debug("filtered.out")
            logger.warning("job.failed", job="j9", vm="vm02", error="disk 1: reset")
            message = receiver.messages.get(timeout=WAIT)
        finally:
            log.configure()  # closes the forwarder
            structlog.configure(**saved)
    finally:
        receiver.stop()
    m = parse(message)
    assert (m.facility, m.severity, m.msgid, m.app) == (Facility.DAEMON, 4, "job.failed", "tessera")
    assert m.sd == {SD_ID: {"job": "j9", "vm": "vm02", "error": "disk 1: reset"}}
    assert receiver.messages.empty()
