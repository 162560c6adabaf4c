"""``EngineClient``: the oVirt engine REST API, called from asyncio without blocking the loop.

    async with EngineClient(EngineConfig(url, username, password_file, ca_file)) as client:
        version = await client.test()
        vm = await client.call(
            lambda conn: conn.system_service().vms_service().vm_service(vm_id).get(),
            "get VM", obj=f"VM {vm_id}",
        )

      event loop                     executor (MAX_API_CALLS threads, "ovirt-api-<n>_<i>")
      call(fn, what) ─ retry ─▶ run_in_executor ─▶ thread-local Connection ─▶ fn(conn)
                       ▲                                   │ first one logs in (SSO),
                       └── EngineError ◀── map sdk.Error ◀─┘ the others reuse its token

The SDK blocks in pycurl, and one ``Connection`` serialises every request made through it
(it holds a lock until its own response arrives, API-NOTES § 10.5), so each executor thread
lazily opens its own ``Connection``. They share one SSO token: one login per client. The
SDK's ``wait=False`` futures are never used: a transport error on one of them can leave
another blocked forever (API-NOTES § 10.5).

SSO tokens expire (after 30 idle minutes, and 10 hours after login, on a default engine), so
a long backup or a daemon running for days outlives its token. Every ``Connection`` keeps
the password, and the SDK answers the engine's 401 by logging in again and repeating the
request once (API-NOTES § 1.2), so each thread's connection renews its own token when it
finds it expired; the client remembers the newest token and gives it to every thread's
connection before its next call, so one renewal serves them all (one SSO session).

``engine_ca()`` is the engine CA that imageio's certificates are verified with
(``engine_ca``: the configured ``ca_file``, else fetched from the engine once per client).

Errors (all ``EngineError``; the SDK's never escape ``call``):

- ``EngineAuthError``    (a ``ConfigError``) bad credentials or missing permission; not retried.
- ``EngineNotFound``     the object does not exist (HTTP 404); not retried.
- ``EngineUnavailable``  (a ``TransientError``) connection refused/reset, timeout, HTTP 5xx;
                         retried by ``call`` with the client's ``RetryPolicy``, then raised.
- ``EngineTlsError``     (a ``ConfigError``) the engine's TLS certificate is not trusted: the
                         configured ``ca_file`` (or, without one, the system's CAs) did not
                         issue it; the message says so and where the engine CA is. Not retried.
- ``EngineApiError``     any other refusal (400, 409…) with the HTTP code and fault detail.
- ``ConfigError``        the password file cannot be read or is empty.
"""

import asyncio
import itertools
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import ovirtsdk4 as sdk
import structlog

from engine.config.models import EngineSection
from engine.core.errors import ConfigError, EngineError, TransientError
from engine.util.retry import RetryPolicy, retry
from plugins.ovirt.engine_ca import EngineCa, load_engine_ca, pki_url
from plugins.ovirt.polling import LOOP_CLOCK, Clock

log = structlog.get_logger("tessera.ovirt")

T = TypeVar("T")

# Parallel API calls per client. The engine runs every REST request on its own thread pool and
# backup flows mostly poll; a handful of concurrent calls hides latency without letting one
# Tessera daemon flood an engine that other tools (the admin portal, monitoring) also use.
MAX_API_CALLS = 4

# Seconds one SDK request may take in total, connecting included (libcurl's whole-transfer
# timeout). Inventory and backup calls answer in well under a second on a healthy engine; a
# minute rides out a busy engine while still turning a hung one into a retryable error.
REQUEST_TIMEOUT = 60

# ovirtsdk4 4.6.3 has no separate connect timeout (its ``Connection`` only takes the total
# ``timeout`` above). A refused connection fails at once; an unreachable host waits up to
# REQUEST_TIMEOUT. This constant documents that bound for callers and logs.
CONNECT_TIMEOUT = REQUEST_TIMEOUT

# Retries for transient failures: an engine restart (ovirt-engine takes ~30 s to come back)
# should not fail a nightly backup, but a dead engine should be reported within a minute.
DEFAULT_RETRY = RetryPolicy(attempts=4, base_delay=1.0, max_delay=10.0)

# libcurl errors that say "try again later": couldn't connect (7), timed out (28), empty
# reply (52), send/receive failure (55/56). The SDK reports some of them only as a generic
# ``Error`` whose message quotes the curl code (multi-handle errors, API-NOTES § 10.5).
_TRANSIENT_CURL_CODES = frozenset({7, 28, 52, 55, 56})
# libcurl errors that say "the peer's certificate did not verify": peer failed verification
# (60; 51 in older libcurl) and the CA file could not be used (77). Waiting does not fix them.
_TLS_CURL_CODES = frozenset({51, 60, 77})
_CURL_CODE = re.compile(r"\(\s*(?:<[^>]*>\s*,\s*)?(\d+)\s*,")

_client_ids = itertools.count(1)


class EngineAuthError(ConfigError):
    """The engine refused the credentials or the permission (SSO error, HTTP 401/403)."""

    template = "oVirt engine {url}: {what} as user {user}: authentication failed: {reason}"


class EngineNotFound(EngineError):
    """The object the operation names does not exist on the engine (HTTP 404)."""

    template = "oVirt engine {url}: {what}: {object} not found"


class EngineUnavailable(TransientError):
    """The engine could not be reached or failed temporarily (refused, timeout, HTTP 5xx)."""

    template = "oVirt engine {url}: {what}: engine unavailable: {reason}"


class EngineTlsError(ConfigError):
    """The engine's certificate did not verify against the CA Tessera was given (``ca_file``,
    else the system's CAs): a wrong or missing ``ca_file``, never worth a retry."""

    template = (
        "oVirt engine {url}: {what}: the engine's TLS certificate is not trusted ({reason}); {hint}"
    )


class EngineApiError(EngineError):
    """The engine refused the operation; ``code`` is the HTTP status (None: no response)."""

    template = "oVirt engine {url}: {what}: {object}: HTTP {code}: {reason}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to reach one engine. The password lives in a file, never in config or memory.

    ``url`` is the API URL (``https://engine.example/ovirt-engine/api``). ``password_file``
    is read when a connection is opened (so a rotated password is picked up on the next login);
    one trailing newline is ignored. ``ca_file`` is the engine CA in PEM; None uses the system
    store. ``max_calls`` bounds the threads (and connections) of one client; ``gate``
    (e.g. the daemon's ``api/<engine>`` named limit) bounds calls across all clients of an
    engine: every call holds it while its request runs.
    """

    url: str
    username: str
    password_file: Path
    ca_file: Path | None = None
    request_timeout: int = REQUEST_TIMEOUT
    max_calls: int = MAX_API_CALLS
    gate: Callable[[], AbstractAsyncContextManager[object]] | None = None

    @classmethod
    def from_section(
        cls,
        section: EngineSection,
        gate: Callable[[], AbstractAsyncContextManager[object]] | None = None,
    ) -> "EngineConfig":
        """From the daemon configuration's ``engines`` entry."""
        return cls(
            url=section.url,
            username=section.username,
            password_file=section.password_file,
            ca_file=section.ca_file,
            gate=gate,
        )

    def record(self) -> dict[str, str | None]:
        """What a job journal keeps (``engine``) so that recovery can reach the engine again:
        paths, never the password."""
        return {
            "url": self.url,
            "username": self.username,
            "password_file": str(self.password_file),
            "ca_file": str(self.ca_file) if self.ca_file else None,
        }

    @classmethod
    def from_record(cls, doc: Mapping[str, Any]) -> "EngineConfig":
        """The inverse of ``record`` (recovery after a killed job)."""
        return cls(
            url=doc["url"],
            username=doc["username"],
            password_file=Path(doc["password_file"]),
            ca_file=Path(doc["ca_file"]) if doc.get("ca_file") else None,
        )


class EngineClient:
    """One engine: a pool of ``max_calls`` threads, each with its own SDK ``Connection``.

    Construction does no I/O; the first ``call`` logs in. The client owns its connections and
    threads: ``close()`` (or leaving ``async with``) waits for calls in flight, logs every SSO
    token out, closes every connection and joins the threads. Use one client from one event
    loop. ``retry_policy``/``sleep`` are injectable so tests run quickly and never wait.
    ``clock`` is what every wait on this engine's objects reads (``polling``): a transfer's
    phases, a snapshot's status, a backup's phase.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        retry_policy: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Clock = LOOP_CLOCK,
    ) -> None:
        if config.max_calls < 1:
            raise ConfigError(message=f"oVirt engine {config.url}: max_calls must be ≥ 1")
        self.config = config
        self.thread_name_prefix = f"ovirt-api-{next(_client_ids)}"
        self.clock = clock
        self._retry_policy = retry_policy
        self._sleep = sleep
        self._executor = ThreadPoolExecutor(
            max_workers=config.max_calls, thread_name_prefix=self.thread_name_prefix
        )
        self._local = threading.local()
        # Two locks so the event loop never waits for a login: _login_lock is held across the
        # SSO request (guards _token); _lock only for list/flag updates (_connections, _closed).
        self._login_lock = threading.Lock()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._connections: list[sdk.Connection] = []
        self._closed = False
        self._ca: EngineCa | None = None
        self._ca_lock = asyncio.Lock()

    # --- public API ---------------------------------------------------------------------------

    async def call(
        self,
        fn: Callable[[sdk.Connection], T],
        what: str,
        *,
        obj: str | None = None,
        idempotent: bool = True,
    ) -> T:
        """Run ``fn(conn)`` in a worker thread with that thread's ``Connection``; return its result.

        ``what`` names the operation ("list VMs") and ``obj`` the object ("VM <id>"); both go
        into every error. ``fn`` runs in a worker thread: it may block, must not touch the event
        loop, and must return plain data (SDK objects are fine; they are not tied to the
        connection). Transient failures are retried, so ``fn`` runs again from the start; pass
        ``idempotent=False`` for calls that must not be repeated (POSTs that create things).
        Raises the ``EngineError`` subclasses listed in the module docstring; exceptions ``fn``
        raises itself that are not ``ovirtsdk4.Error`` pass through unchanged. Cancelling the
        awaiting task does not stop a request already running in its thread.
        """
        loop = asyncio.get_running_loop()

        async def attempt() -> T:
            if self._closed:
                raise RuntimeError(f"EngineClient for {self.config.url} is closed")
            gate = self.config.gate() if self.config.gate is not None else nullcontext()
            try:
                async with gate:
                    return await loop.run_in_executor(self._executor, self._run, fn)
            except sdk.Error as e:
                raise self._map_error(e, what, obj or what) from e

        def on_retry(n: int, error: BaseException) -> None:
            log.warning("engine call failed, retrying", what=what, attempt=n, error=str(error))

        policy = self._retry_policy if idempotent else RetryPolicy(attempts=1)
        return await retry(attempt, policy=policy, on_retry=on_retry, sleep=self._sleep)

    async def engine_ca(self) -> EngineCa:
        """The engine CA for imageio (``engine_ca.load_engine_ca``), loaded once per client.

        Raises ``EngineCaError`` (a ``ConfigError``) or ``EngineCaUnavailable``."""
        async with self._ca_lock:
            if self._ca is None:
                self._ca = await load_engine_ca(self.config.url, self.config.ca_file)
            return self._ca

    async def test(self) -> str:
        """Log in and read the API root; return the engine's version ("4.5.7-…").

        Raises like ``call`` (``EngineAuthError`` for bad credentials, ``EngineUnavailable``
        when the engine cannot be reached after retries).
        """

        def read(conn: sdk.Connection) -> str:
            api = conn.system_service().get()
            version = api.product_info.version if api.product_info else None
            if version is None:
                return "unknown"
            return str(version.full_version or f"{version.major}.{version.minor}")

        return await self.call(read, "test connection", obj="API root")

    async def close(self) -> None:
        """Wait for calls in flight, log out, close every connection, join the threads.

        Idempotent. Logout failures are logged, not raised: the connections are closed anyway.
        Waiting is bounded by the SDK's ``request_timeout`` per call in flight.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.to_thread(self._shutdown)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"EngineClient(url={self.config.url!r}, user={self.config.username!r})"

    # --- worker threads -------------------------------------------------------------------------

    def _run(self, fn: Callable[[sdk.Connection], T]) -> T:
        """In a worker thread: run ``fn`` with this thread's connection, opening it if needed."""
        conn: sdk.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
        else:
            # Another thread renewed the client's token since this connection last ran: use
            # it, rather than find the old one expired and log in once more (a second SSO
            # session). The SDK keeps the token in ``_sso_token`` (ovirtsdk4 4.6, read by
            # ``authenticate`` and sent as the Bearer header of every request).
            with self._login_lock:
                newest = self._token
            if newest is not None and conn.authenticate() != newest:
                conn._sso_token = newest  # the SDK has no setter
        try:
            return fn(conn)
        finally:
            # A 401 made the SDK log in again: threads opened later start from this token
            # instead of each finding the old one expired. (authenticate() makes no request
            # while the connection has a token.)
            token = conn.authenticate()
            if token != self._token:
                with self._login_lock:
                    self._token = token

    def _open(self) -> sdk.Connection:
        """In a worker thread: a new Connection; the first one of the client logs in.

        The lock makes the first login happen once: threads starting together wait for it and
        then reuse its token (API-NOTES § 10.5), so the engine sees a single SSO session.
        """
        password = self._read_password()
        with self._login_lock:
            conn = sdk.Connection(
                url=self.config.url,
                username=self.config.username,
                password=password,  # kept so the SDK can log in again after a 401
                token=self._token,
                ca_file=str(self.config.ca_file) if self.config.ca_file else None,
                timeout=self.config.request_timeout,
            )
            logged_in = self._token is None
            if logged_in:
                try:
                    self._token = conn.authenticate()
                except BaseException:
                    conn.close(logout=False)
                    raise
        with self._lock:
            if not self._closed:
                self._connections.append(conn)
                return conn
        # close() began meanwhile and will not see this connection: revoke a token it made.
        try:
            conn.close(logout=logged_in)
        except sdk.Error:
            conn.close(logout=False)
        raise RuntimeError(f"EngineClient for {self.config.url} is closed")

    def _read_password(self) -> str:
        path = self.config.password_file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(message=f"oVirt password file {path}: cannot read: {e}") from None
        password = text.removesuffix("\n").removesuffix("\r")
        if not password:
            raise ConfigError(message=f"oVirt password file {path}: empty")
        return password

    def _shutdown(self) -> None:
        """In a helper thread: join the workers, then log out each distinct token once."""
        self._executor.shutdown(wait=True)
        revoked: set[str] = set()
        for conn in self._connections:
            # authenticate() returns the connection's current token without a request: every
            # registered connection has one (shared, or renewed by the SDK after a 401).
            token = conn.authenticate()
            try:
                conn.close(logout=token not in revoked)
            except sdk.Error as e:
                log.warning("engine logout failed", url=self.config.url, error=str(e))
                conn.close(logout=False)
            revoked.add(token)
        self._connections.clear()

    # --- errors ---------------------------------------------------------------------------------

    def _map_error(self, e: sdk.Error, what: str, obj: str) -> EngineError:
        url = self.config.url
        reason = _reason(e)
        if isinstance(e, sdk.AuthError):
            return EngineAuthError(url=url, what=what, user=self.config.username, reason=reason)
        if isinstance(e, sdk.NotFoundError):
            return EngineNotFound(url=url, what=what, object=obj, reason=reason)
        if (tls := _tls_reason(e)) is not None:
            return EngineTlsError(
                url=url, what=what, reason=tls, hint=ca_hint(url, self.config.ca_file)
            )
        if _is_transient(e):
            status = f"HTTP {e.code}: " if isinstance(e.code, int) else ""
            return EngineUnavailable(
                url=url, what=what, object=obj, code=e.code, reason=status + reason
            )
        return EngineApiError(url=url, what=what, object=obj, code=e.code, reason=reason)


def _reason(e: sdk.Error) -> str:
    fault = e.fault
    if fault is not None and (fault.detail or fault.reason):
        return str(fault.detail or fault.reason)
    return str(e)


def ca_hint(url: str, ca_file: Path | None) -> str:
    """What to do when the engine's certificate is not trusted with ``ca_file``."""
    where = f"download the engine CA from {pki_url(url)}"
    if ca_file is None:
        return (
            "no ca_file is set and the system's CAs do not trust the engine: "
            f"{where} and set ca_file to it"
        )
    return (
        f"ca_file {ca_file} is not the CA that issued the engine's certificate: {where} and "
        "set ca_file to it"
    )


def _tls_reason(e: sdk.Error) -> str | None:
    """The verification failure of a libcurl certificate error, else None."""
    if isinstance(e.code, int):
        return None
    text = str(e)
    match = _CURL_CODE.search(text)
    if match is None or int(match.group(1)) not in _TLS_CURL_CODES:
        return None
    detail = re.search(r"verify result: ([^'\"]*)", text)
    return detail.group(1).strip() if detail else "certificate verification failed"


def _is_transient(e: sdk.Error) -> bool:
    if isinstance(e, sdk.ConnectionError | sdk.TimeoutError):
        return True
    if isinstance(e.code, int):
        return e.code >= 500
    match = _CURL_CODE.search(str(e))
    return match is not None and int(match.group(1)) in _TRANSIENT_CURL_CODES
