"""The imageio data path: read and write one image transfer's disk over HTTP(S).

An image transfer (engine ``imagetransfers``) hands out two URLs ending in the same ticket:
``transfer_url`` (the ovirt-imageio daemon on the host) and ``proxy_url`` (the proxy on the
engine). ``ImageioDisk.connect`` tries the transfer URL with ``OPTIONS`` and falls back to the
proxy only when the host cannot be reached (connection refused, unreachable, timeout); an
HTTP error from the daemon is an answer, so it is raised, not routed around::

    ca = await engine_client.engine_ca()  # engine_ca.EngineCa: the engine's own CA
    async with await ImageioDisk.connect(transfer_url, proxy_url, ca=ca) as disk:
        zeroes = await disk.extents("zero", 0, await disk.size())  # clipped
        reader = await disk.open_reader()  # one HTTP connection
        try:
            await reader.readinto(offset, view)
        finally:
            await reader.close()

What a caller must know:

- Each ``ImageioReader`` / ``ImageioWriter`` owns one keep-alive connection (a reader its
  own HTTP/1.1 client, ``http11``; a writer an aiohttp session), so N of them are N
  parallel transfers (imageio serves ``max_readers`` / ``max_writers``
  connections per ticket, see ``options()``). A writer may not be used by two tasks at
  once; a reader by up to its ``pipeline`` tasks (``PIPELINE``: GETs in flight on its
  connection, answered in order).
  ``ImageioDisk`` has its own connection for OPTIONS and extents. Whoever opens closes.
- ``extents(context, offset, length)``: imageio answers with the extents of the whole image;
  the first call per context fetches them once, later calls clip the cached list (a backup
  reads a read-only export, so they cannot change; call ``forget_extents()`` after writing).
  ``"zero"`` extents carry ``zero``/``hole``, ``"dirty"`` extents carry only ``dirty`` (as
  ``engine.core.extent`` requires); ``"dirty"`` needs a ticket added with ``dirty=true``.
- ``readinto`` sends one ranged GET and receives the body straight into the caller's
  buffer (no copy in between) once the 206 status, ``Content-Range`` and Content-Length
  match the request; anything else is read aside and raised as an error.
  Writers send ``PUT`` (with ``flush=n``), ``PATCH zero`` and ``PATCH flush``: data is only
  durable after ``flush()``; after a failure, resend everything since the last flush.
- ``https`` URLs verify the server (certificate and host name) against ``ca``, the engine
  CA (``engine_ca``): imageio's certificates are issued by it, never by a public CA. Without
  ``ca`` the system's CAs are used, which fails against every real engine. A certificate that
  does not verify raises ``ImageioTlsError`` naming the URL and the CA's source at once: it is
  not retried and not routed around through the proxy (both present the same CA's
  certificates, and a mismatch is a configuration error or an interception). Plain ``http``
  URLs get no TLS; no engine hands them out.
- Tickets expire (the engine gives them ``ImageTransferClientTicketValidityInSeconds``, 300 s;
  imageio restarts that time after each request it completes) and imageio then answers 403 to
  everything: a transfer left idle that long is lost, e.g. a backup's second disk while the
  first one is read. ``connect(..., keep_alive=extend)`` runs a ``TicketKeeper`` that calls
  ``extend()`` (the engine's ``extend`` action on the transfer) every ``EXTEND_INTERVAL``
  seconds until ``close()``.

Errors (all ``EngineError``, naming the URL with the ticket shortened, the operation, offset
and HTTP status)::

    ImageioError                   400, 404, 416…: the request is wrong; never retried
    ├── ImageioTicketGone          403: the ticket expired or was removed (transfer over)
    ├── ImageioTlsError            the TLS handshake failed: the certificate is not the CA's
    └── ImageioTransientError      5xx, connection errors, timeouts, short bodies;
        (also TransientError)      retry on a new reader/writer
"""

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog

from engine.core.errors import EngineError, TransientError
from engine.core.extent import Extent
from engine.sources.types import DiskReader, DiskWriter
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.http11 import Head, HttpConnection, HttpError, HttpProtocolError

# Connecting to a host's daemon or the engine's proxy: on a healthy network this takes
# milliseconds; a host that has not accepted within 10 s is down or filtered, and waiting
# longer only delays the fallback to the proxy.
CONNECT_TIMEOUT: Final = 10.0
# No byte for this long on an open connection: imageio reads from shared storage through
# qemu-nbd, and a storage domain failover can stall I/O for tens of seconds; beyond a minute
# the request is retried on a new connection.
READ_TIMEOUT: Final = 60.0
# One whole request (a read or write of one chunk, at most tens of MiB): even at 1 MiB/s
# it is done in this time; anything slower is stuck.
REQUEST_TIMEOUT: Final = 300.0
# Characters of the ticket id kept in error messages: the ticket is a bearer credential
# for the disk's data until it expires, while a prefix still finds it in the daemon's log.
TICKET_SHOWN: Final = 8
# How much of an error response body an error quotes.
BODY_TAIL: Final = 512
# Seconds between two extends of a transfer's ticket. The engine's tickets live 300 s
# (ImageTransferClientTicketValidityInSeconds) from the last extend: extending every minute
# leaves room for four missed extends (an engine restart, a run of retried 503s) before the
# ticket expires mid-transfer.
EXTEND_INTERVAL: Final = 60.0
# GETs an ImageioReader keeps in flight on its one connection (``ImageioReader.pipeline``).
PIPELINE: Final = 2

log = structlog.get_logger("tessera.ovirt")

ExtentContext = Literal["zero", "dirty"]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class ImageioError(EngineError):
    """An imageio request failed and repeating it will not help."""

    template = "imageio {url}: {op} at offset {offset}: HTTP {status}: {reason}"


class ImageioTicketGone(ImageioError):
    """403: imageio no longer knows the ticket (it expired, or the transfer ended)."""

    template = (
        "imageio {url}: {op} at offset {offset}: HTTP {status}: the ticket expired or was "
        "removed (the image transfer is over; start a new one): {reason}"
    )


class ImageioTransientError(ImageioError, TransientError):
    """The daemon failed (5xx) or the connection did; retry on a new connection."""


class ImageioTlsError(ImageioError):
    """The TLS handshake failed: the server's certificate does not verify with the engine CA
    (or its host name does not match), or the server does not speak TLS."""

    template = (
        "imageio {url}: {op}: TLS handshake failed, the server's certificate was checked "
        "against the engine CA {ca}: {reason}"
    )


def _ticket(url: str) -> str:
    return urlsplit(url).path.rstrip("/").rpartition("/")[2]


def _short(ticket: str) -> str:
    return ticket[:TICKET_SHOWN] + "…" if len(ticket) > TICKET_SHOWN else ticket


def redact(url: str) -> str:
    """``url`` with the ticket (the last path segment) cut to ``TICKET_SHOWN`` characters."""
    parts = urlsplit(url)
    head, _, ticket = parts.path.rpartition("/")
    return urlunsplit(parts._replace(path=f"{head}/{_short(ticket)}", query=""))


def _ssl_context(url: str, ca: EngineCa | None) -> ssl.SSLContext | None:
    if urlsplit(url).scheme != "https":
        return None
    return ca.context() if ca is not None else ssl.create_default_context()


def _ca_source(ca: EngineCa | None) -> str:
    return ca.source if ca is not None else "(none given: the system's CAs)"


def _session(url: str, ca: EngineCa | None) -> aiohttp.ClientSession:
    # limit=1: one connection per session, so a session is one of the N parallel streams.
    connector = aiohttp.TCPConnector(limit=1, ssl=_ssl_context(url, ca) or False)
    timeout = aiohttp.ClientTimeout(
        total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _error(resp: aiohttp.ClientResponse, url: str, op: str, offset: int) -> ImageioError:
    """The error for a response with an unexpected status (reads its body)."""
    try:
        body = await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError):
        body = ""
    return _status_error(url, op, offset, resp.status, resp.reason, body)


def _status_error(
    url: str, op: str, offset: int, status: int, phrase: str | None, body: str
) -> ImageioError:
    """The error for an unexpected ``status``, quoting the end of its ``body``."""
    body = body.strip()[-BODY_TAIL:]
    ticket = _ticket(url if not url.endswith("/extents") else url.removesuffix("/extents"))
    if ticket:  # imageio quotes the ticket in its messages ("No such ticket <id>")
        body = body.replace(ticket, _short(ticket))
    reason = body or phrase or "(no body)"
    fields = {"url": redact(url), "op": op, "offset": offset, "status": status}
    if status == 403:
        return ImageioTicketGone(**fields, reason=reason)
    if status >= 500:
        return ImageioTransientError(**fields, reason=reason)
    return ImageioError(**fields, reason=reason)


def _connection_error(
    url: str, op: str, offset: int, e: BaseException, ca: EngineCa | None
) -> ImageioError:
    if isinstance(e, aiohttp.ClientSSLError | ssl.SSLError):
        # aiohttp wraps the ssl error; its own text repeats host and port around it.
        cause = e.__cause__ or getattr(e, "certificate_error", None) or e
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
        return ImageioTlsError(
            url=redact(url),
            op=op,
            offset=offset,
            status="(none)",
            ca=_ca_source(ca),
            reason=str(reason or cause),
        )
    reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if isinstance(e, HttpProtocolError):  # the server garbles HTTP: asking again won't help
        return ImageioError(url=redact(url), op=op, offset=offset, status="(none)", reason=reason)
    return ImageioTransientError(
        url=redact(url), op=op, offset=offset, status="(none)", reason=reason
    )


# Errors that mean "no usable answer": the connection failed, broke or timed out.
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


@dataclass(frozen=True)
class ImageioOptions:
    """What ``OPTIONS`` says about a ticket: allowed methods and features.

    ``max_readers`` / ``max_writers`` are the connections imageio serves per ticket; they are
    None when the server does not say (old daemons, ``OPTIONS /images/*``)."""

    allow: frozenset[str]
    features: frozenset[str]
    max_readers: int | None
    max_writers: int | None


class TicketKeeper:
    """Keeps one image transfer's ticket alive: ``extend()`` every ``interval`` seconds (the
    module's ``EXTEND_INTERVAL`` when None) from ``start()`` until ``stop()``.

    The keeper owns one task; ``stop()`` cancels and awaits it (call it in ``finally``). A
    failed extend (``EngineError``: the engine is unreachable after its retries, or refuses)
    is logged naming ``what`` and tried again at the next tick: the transfer itself reports a
    ticket that really expired (403, ``ImageioTicketGone``). ``sleep`` is injectable so tests
    run the schedule without waiting."""

    def __init__(
        self,
        extend: Callable[[], Awaitable[None]],
        what: str,
        *,
        interval: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.interval = EXTEND_INTERVAL if interval is None else interval
        if self.interval <= 0:
            raise ValueError(f"{what}: ticket extend interval {self.interval} is not positive")
        self.what = what
        self.extends = 0  # successful extends so far
        self._extend = extend
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.what}: ticket keeper already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"extend ticket of {self.what}"
        )

    async def _run(self) -> None:
        while True:
            await self._sleep(self.interval)
            try:
                await self._extend()
            except EngineError as e:
                log.warning("cannot extend the image transfer", what=self.what, error=str(e))
            else:
                self.extends += 1

    async def stop(self) -> None:
        """Cancel the task and wait for it; idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() raises only if *we* are cancelled meanwhile; the keeper's own CancelledError
        # is the expected end, and anything else it raised is a bug to report.
        await asyncio.wait([task])
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


class ImageioDisk:
    """One image transfer's data endpoint. Make it with ``connect``; close it when done."""

    def __init__(
        self,
        url: str,
        options: ImageioOptions,
        session: aiohttp.ClientSession,
        *,
        ca: EngineCa | None,
    ) -> None:
        self.url = url
        self.ca = ca
        self._options = options
        self._session = session
        self._extents: dict[str, list[Extent]] = {}
        self._extents_lock = asyncio.Lock()
        self._size: int | None = None
        self._keeper: TicketKeeper | None = None

    @classmethod
    async def connect(
        cls,
        transfer_url: str,
        proxy_url: str | None = None,
        *,
        ca: EngineCa | None = None,
        keep_alive: Callable[[], Awaitable[None]] | None = None,
    ) -> "ImageioDisk":
        """Pick the transfer URL if its daemon answers OPTIONS, else the proxy URL.

        ``ca`` is the engine CA every https URL is verified with (module docstring).
        Only a connection failure falls back; an HTTP error (403 for a gone ticket…) and a
        certificate that does not verify (``ImageioTlsError``) raise.
        Raises ``ImageioTransientError`` if neither can be reached. ``keep_alive`` (the
        engine's ``extend`` of this transfer) runs in a ``TicketKeeper`` until ``close()``."""
        candidates = [transfer_url]
        if proxy_url and proxy_url != transfer_url:
            candidates.append(proxy_url)
        failures: list[str] = []
        for url in candidates:
            session = _session(url, ca)
            try:
                options = await _options(session, url, ca)
            except ImageioTransientError as e:
                await session.close()
                if e.fields.get("status") != "(none)":
                    raise  # a 5xx is an answer from the daemon, not an unreachable host
                failures.append(str(e))
                continue
            except BaseException:
                await session.close()
                raise
            disk = cls(url, options, session, ca=ca)
            if keep_alive is not None:
                disk._keeper = TicketKeeper(keep_alive, redact(url))
                disk._keeper.start()
            return disk
        raise ImageioTransientError(
            url=redact(transfer_url),
            op="OPTIONS",
            offset=0,
            status="(none)",
            reason="no URL of the transfer can be reached: " + "; ".join(failures),
        )

    async def options(self) -> ImageioOptions:
        """Ask the server again (``connect`` already asked once: see ``cached_options``)."""
        self._options = await _options(self._session, self.url, self.ca)
        return self._options

    @property
    def cached_options(self) -> ImageioOptions:
        return self._options

    async def size(self) -> int:
        """The disk's virtual size, from the end of the zero extents."""
        if self._size is None:
            extents = await self._whole("zero")
            self._size = extents[-1].end if extents else 0
        return self._size

    async def extents(self, context: ExtentContext, offset: int, length: int) -> list[Extent]:
        """Extents of ``context`` covering ``[offset, offset + length)`` clipped to it (and to
        the disk's end), merged where neighbours have the same flags."""
        if offset < 0 or length <= 0:
            raise ValueError(f"extents at offset {offset} length {length}: empty or negative")
        end = offset + length
        out: list[Extent] = []
        for e in await self._whole(context):
            if e.end <= offset:
                continue
            if e.start >= end:
                break
            start, stop = max(e.start, offset), min(e.end, end)
            if out and out[-1].same_flags(e) and out[-1].end == start:
                prev = out.pop()
                start = prev.start
            out.append(Extent(start, stop - start, zero=e.zero, hole=e.hole, dirty=e.dirty))
        return out

    def forget_extents(self) -> None:
        """Drop the cached extents (after writes changed them)."""
        self._extents.clear()

    async def _whole(self, context: ExtentContext) -> list[Extent]:
        async with self._extents_lock:  # concurrent windows share one fetch
            if context not in self._extents:
                self._extents[context] = await self._fetch_extents(context)
            return self._extents[context]

    async def _fetch_extents(self, context: ExtentContext) -> list[Extent]:
        url = f"{self.url}/extents"
        op = f"GET extents?context={context}"
        try:
            async with self._session.get(url, params={"context": context}) as resp:
                if resp.status != 200:
                    raise await _error(resp, url, op, 0)
                data = await resp.json()
        except _CONNECTION_ERRORS as e:
            raise _connection_error(url, op, 0, e, self.ca) from e
        return _parse_extents(data, context, url)

    async def open_reader(self) -> "ImageioReader":
        """A new connection for reading (not connected until its first request)."""
        return ImageioReader(self.url, ca=self.ca)

    async def open_writer(self) -> "ImageioWriter":
        """A new connection for writing; the ticket must allow writes (zero and flush)."""
        missing = {"zero", "flush"} - self._options.features
        if "PUT" not in self._options.allow or missing:
            raise ImageioError(
                url=redact(self.url),
                op="open writer",
                offset=0,
                status=200,
                reason=f"the ticket does not allow writing (allow={sorted(self._options.allow)}, "
                f"features={sorted(self._options.features)})",
            )
        return ImageioWriter(self.url, ca=self.ca)

    async def close(self) -> None:
        """Stop extending the ticket, close the connection."""
        keeper, self._keeper = self._keeper, None
        try:
            if keeper is not None:
                await keeper.stop()
        finally:
            await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _options(session: aiohttp.ClientSession, url: str, ca: EngineCa | None) -> ImageioOptions:
    try:
        async with session.options(url) as resp:
            if resp.status != 200:
                raise await _error(resp, url, "OPTIONS", 0)
            data = await resp.json()
            allow = resp.headers.get("Allow", "")
    except _CONNECTION_ERRORS as e:
        raise _connection_error(url, "OPTIONS", 0, e, ca) from e
    if not isinstance(data, dict):
        raise ImageioError(
            url=redact(url), op="OPTIONS", offset=0, status=200, reason=f"not an object: {data!r}"
        )
    max_readers, max_writers = data.get("max_readers"), data.get("max_writers")
    return ImageioOptions(
        allow=frozenset(m.strip().upper() for m in allow.split(",") if m.strip()),
        features=frozenset(str(f) for f in data.get("features", ())),
        max_readers=max_readers if isinstance(max_readers, int) else None,
        max_writers=max_writers if isinstance(max_writers, int) else None,
    )


def _parse_extents(data: Any, context: ExtentContext, url: str) -> list[Extent]:
    """imageio's JSON extents → sorted, contiguous, merged ``Extent`` list."""
    op = f"GET extents?context={context}"
    out: list[Extent] = []
    try:
        for item in data:
            start, length = int(item["start"]), int(item["length"])
            if context == "dirty":
                e = Extent(start, length, dirty=bool(item["dirty"]))
            else:
                e = Extent(start, length, zero=bool(item["zero"]), hole=bool(item.get("hole")))
            if out and out[-1].end != start:
                raise ValueError(
                    f"extent at {start} does not follow the one ending at {out[-1].end}"
                )
            if out and out[-1].same_flags(e):
                prev = out.pop()
                e = Extent(prev.start, prev.length + length, e.zero, e.hole, e.dirty)
            out.append(e)
    except (TypeError, KeyError, ValueError) as e:
        raise ImageioError(
            url=redact(url), op=op, offset=0, status=200, reason=f"bad extents: {e}"
        ) from e
    if out and out[0].start != 0:
        raise ImageioError(
            url=redact(url), op=op, offset=0, status=200, reason="extents do not start at 0"
        )
    return out


class ImageioReader:
    """One connection reading a disk (``engine.sources.types.DiskReader``).

    It speaks HTTP/1.1 itself (``plugins.ovirt.http11``) so that each response body is
    received straight into the caller's buffer instead of through aiohttp's ``bytes`` and a
    copy. Measured with ``tests.bench ovirt``'s full backup of the 1 GiB lab VM (980 MiB of
    data, 1 MiB chunks, 4 readers; fake engine, real imageio and qemu-nbd on the same 2
    cores, which another tenant was loading), aiohttp → this reader, medians of 3
    interleaved runs, three rounds:

    - the CLI's CPU seconds: 6.51 → 5.45, 5.94 → 5.28, 6.10 → 5.35;
    - the disk's read-and-encode phase: 157 → 184, 177 → 195, 179 → 200 MB/s;
    - the job: 116.6 → 129.3, 121.9 → 129.9, 126.2 → 132.1 MB/s; against the same image
      backed up locally in the same run 0.40 → 0.42, 0.44 → 0.51, 0.43 → 0.43 (the local
      runs varied as much as the gain).

    Up to ``pipeline`` tasks may call ``readinto`` at once: their GETs go out on the one
    connection as they come and the daemon answers them in order, so it starts on the next
    range while the client still takes in the last one. Measured (docs/DESIGN.md, section 9,
    issue 15): a copy-only read 691 → 777 MB/s on 2 connections and 700 → 812 MB/s on 4 with
    idle CPU, at the same 0.7 CPU-s per GiB; the lab backup, CPU-bound on 2 cores shared with
    the daemon, showed no change beyond the noise. The rest of the gap is not in this reader."""

    def __init__(self, url: str, *, ca: EngineCa | None = None, pipeline: int = PIPELINE) -> None:
        self.url = url
        self.ca = ca
        self.pipeline = pipeline
        self._conn = HttpConnection(
            url,
            _ssl_context(url, ca),
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
            pipeline=pipeline,
        )

    @property
    def connections(self) -> int:
        """Connections opened so far: 1 while keep-alive holds."""
        return self._conn.connections

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``: one ``GET`` with ``Range``, the body
        received into ``buf``. After an error or cancellation ``buf`` may hold part of the
        body and is not written to any more.

        Raises ``ImageioTicketGone`` (403), ``ImageioTransientError`` (5xx, connection
        errors, timeouts, a short body), ``ImageioTlsError`` (the certificate does not
        verify with the engine CA) or ``ImageioError`` (anything else unexpected)."""
        view = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        try:
            await self._readinto(offset, view)
        finally:
            if view is not buf:  # ours: no export of the caller's buffer outlives the call
                view.release()

    async def _readinto(self, offset: int, view: memoryview) -> None:
        length = len(view)
        if length == 0:
            return
        op = f"GET {length} bytes"
        expected = (offset, offset + length - 1)

        def body_into(head: Head) -> memoryview | None:
            # Only a 206 of exactly the range asked for goes into the caller's buffer.
            if head.status == 206 and head.length == length and _range(head) == expected:
                return view
            return None

        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        try:
            resp = await self._conn.request("GET", headers, body_into=body_into)
        except (OSError, TimeoutError, HttpError) as e:
            raise _connection_error(self.url, op, offset, e, self.ca) from e
        if resp.into_view:
            return
        head = resp.head
        fields = {"url": redact(self.url), "op": op, "offset": offset, "status": head.status}
        if head.status != 206:
            if resp.truncated:  # not an error message: data (a whole disk sent as 200?)
                phrase = f"{head.reason} (a body of {head.length or 'unknown'} bytes, not read)"
                raise _status_error(self.url, op, offset, head.status, phrase, "")
            body = resp.body.decode("utf-8", errors="replace")
            raise _status_error(self.url, op, offset, head.status, head.reason, body)
        if _range(head) != expected:
            value = head.headers.get("content-range", "")
            raise ImageioError(
                **fields,
                reason=f"Content-Range {value!r} does not match "
                f"bytes {offset}-{offset + length - 1}",
            )
        if head.length is not None and head.length < length:
            raise ImageioTransientError(
                **fields, reason=f"short body: {head.length} of {length} bytes"
            )
        raise ImageioError(
            **fields,
            reason=f"server sent {head.length if head.length is not None else 'an unframed'} "
            f"body for the {length} bytes asked for",
        )

    async def close(self) -> None:
        await self._conn.close()


def _range(head: Head) -> tuple[int, int] | None:
    m = _CONTENT_RANGE.fullmatch(head.headers.get("content-range", "").strip())
    return (int(m[1]), int(m[2])) if m is not None else None


class ImageioWriter:
    """One connection writing a disk (``engine.sources.types.DiskWriter``).

    Writes are not flushed one by one: call ``flush()`` before declaring the data safe."""

    def __init__(self, url: str, *, ca: EngineCa | None = None) -> None:
        self.url = url
        self.ca = ca
        self._session = _session(url, ca)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """``PUT`` ``data`` at ``offset`` (imageio uses only the start of Content-Range)."""
        length = len(data)
        if length == 0:
            return
        headers = {
            "Content-Range": f"bytes {offset}-{offset + length - 1}/*",
            "Content-Type": "application/octet-stream",
        }
        await self._send(
            "PUT", f"PUT {length} bytes", offset, data=data, headers=headers, params={"flush": "n"}
        )

    async def write_zeroes(self, offset: int, length: int) -> None:
        """``PATCH`` ``zero``: the range reads as zeroes (and may be deallocated)."""
        if length == 0:
            return
        body = {"op": "zero", "offset": offset, "size": length, "flush": False}
        await self._send("PATCH", f"zero {length} bytes", offset, json=body)

    async def flush(self) -> None:
        """``PATCH`` ``flush``: everything written so far is on storage."""
        await self._send("PATCH", "flush", 0, json={"op": "flush"})

    async def _send(self, method: str, op: str, offset: int, **kwargs: Any) -> None:
        try:
            async with self._session.request(method, self.url, **kwargs) as resp:
                if resp.status != 200:
                    raise await _error(resp, self.url, op, offset)
                await resp.read()  # keep the connection reusable
        except _CONNECTION_ERRORS as e:
            raise _connection_error(self.url, op, offset, e, self.ca) from e

    async def close(self) -> None:
        await self._session.close()


if TYPE_CHECKING:  # mypy proves the classes fit the pipeline's protocols

    def _fits(reader: ImageioReader, writer: ImageioWriter) -> tuple[DiskReader, DiskWriter]:
        return reader, writer
