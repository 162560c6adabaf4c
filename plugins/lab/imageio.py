"""A real ovirt-imageio daemon for the lab and for tests.

``ImageioDaemon`` runs the ``ovirt-imageio`` package (installed in the same Python
environment) as a subprocess with a private configuration, so it behaves like the daemon on an
oVirt host without root or systemd, and like it, serves images over TLS only::

    async with ImageioDaemon(ca=lab_ca) as daemon:
        await daemon.add_ticket(ticket, "nbd:unix:/path/nbd.sock", size, ["read"])
        url = daemon.data_url(ticket)  # https://127.0.0.1:PORT/images/<ticket>
        ...   # clients verify it with daemon.ca_file (the engine CA)
        await daemon.remove_ticket(ticket)

What a caller must know:

- Everything the daemon writes (configuration, log, run directory) lives in one private
  directory made under ``base_dir`` (default: the system's temporary directory); ``stop()``
  removes it unless ``keep_dir`` was set. ``log_path`` is the daemon's log, quoted in errors.
- The data service listens on 127.0.0.1 and the control service on localhost (IPv4), both on
  ports the kernel picks (port 0), read back from the daemon's log: no port can be taken by
  someone else between choosing and binding it. The local (unix socket) service is disabled,
  so OPTIONS advertises no ``unix_socket``.
- The data service speaks TLS (imageio's ``[tls] enable = true``, as on every oVirt host)
  with a certificate for 127.0.0.1 issued by ``ca`` (``plugins.lab.tls.LabCa``; a new one
  when not given). Give the fake engine the same CA (``FakeEngine`` takes the daemon's by
  default) and it is the engine CA of a real setup: clients need ``ca_file`` (a copy of the
  CA certificate in the daemon's directory) and a plain ``http://`` client is refused. The
  control service stays plain HTTP on localhost, as vdsm reaches it over a local socket.
- ``start()`` returns once the control service answers; it raises ``ImageioDaemonError``
  (quoting the log) if the daemon exits or is not ready within ``START_TIMEOUT``, and leaves
  nothing running or on disk then. ``stop()`` sends SIGTERM, SIGKILL after ``STOP_TIMEOUT``,
  always reaps the process, and is idempotent.
- Ticket URLs for qemu-nbd exports are ``nbd:unix:<socket path>`` (add
  ``:exportname=<name>`` for a named export).
- Control API failures raise ``ImageioControlError`` with the method, ticket and HTTP status.
"""

import asyncio
import contextlib
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp

from engine.core.errors import EngineError
from plugins.lab.tls import LabCa, TlsFiles

# Starting imports the package and binds two sockets; well under a second on an idle
# machine, but a loaded CI box can be slow to start a Python process.
START_TIMEOUT: Final = 30.0
# On SIGTERM the daemon shuts its services down within one poll interval (0.1 s here).
STOP_TIMEOUT: Final = 10.0
# Readiness polling starts fast and backs off so a slow start costs few wakeups.
POLL_FIRST: Final = 0.01
POLL_MAX: Final = 0.2
# One control request: the daemon answers from memory, except DELETE, which waits up to
# REMOVE_TIMEOUT for ongoing operations on the ticket.
CONTROL_TIMEOUT: Final = 30.0
# The daemon's own wait in DELETE before answering 409 (its default is 60 s; a test ought
# to learn sooner that a ticket is stuck). remove_ticket() retries 409 until REMOVE_DEADLINE.
REMOVE_TIMEOUT: Final = 10
REMOVE_DEADLINE: Final = 60.0
# How much of the daemon's log an error message quotes.
LOG_TAIL: Final = 4096

# The services log "<name> listening on ('127.0.0.1', 12345)" when bound.
_LISTENING = re.compile(r"(remote|control)\.service listening on \('([^']*)', (\d+)")
_READY = "Ready for requests"
# The daemon has no __main__; its console script does exactly this.
_MAIN = "from ovirt_imageio._internal import server; server.main()"


class ImageioDaemonError(EngineError):
    """The daemon could not be started (or did something unexpected)."""

    template = "ovirt-imageio daemon in {path}: {reason}"


class ImageioControlError(EngineError):
    """A control API request failed."""

    template = "ovirt-imageio control {method} ticket {ticket}: HTTP {status}: {reason}"


def _config(directory: Path, remove_timeout: int, tls: TlsFiles) -> str:
    log_file = directory / "daemon.log"
    # The [handler_logfile] args/kwargs are evaluated by logging.config.fileConfig; the
    # default kwargs (maxBytes, backupCount) only suit RotatingFileHandler.
    return f"""\
[daemon]
# How often the services check for shutdown: the default 1 s makes every stop() take 1 s.
poll_interval = 0.1
drop_privileges = false
systemd_enable = false
run_dir = {directory / "run"}

[tls]
enable = true
key_file = {tls.key_file}
cert_file = {tls.cert_file}
ca_file = {tls.ca_file}

[remote]
host = 127.0.0.1
port = 0

[local]
enable = false

[control]
transport = tcp
port = 0
remove_timeout = {remove_timeout}

[profile]
filename = {directory / "run" / "profile"}

[handler_logfile]
keyword__class = logging.handlers.RotatingFileHandler
args = ({str(log_file)!r},)
kwargs = {{"maxBytes": 20971520, "backupCount": 1}}
level = DEBUG
formatter = long
"""


class ImageioDaemon:
    """One ovirt-imageio daemon process (see the module docstring)."""

    def __init__(
        self,
        base_dir: str | Path | None = None,
        *,
        keep_dir: bool = False,
        remove_timeout: int = REMOVE_TIMEOUT,
        python: str = sys.executable,
        ca: LabCa | None = None,
    ) -> None:
        if remove_timeout < 1:
            # remove_ticket() relies on the daemon waiting before it answers 409.
            raise ValueError(f"remove_timeout must be at least 1 s, not {remove_timeout}")
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.keep_dir = keep_dir
        self.remove_timeout = remove_timeout
        self.python = python
        self.ca = ca if ca is not None else LabCa()  # signs the data service's certificate
        self._tls: TlsFiles | None = None
        self._dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._remote_port: int | None = None
        self._control_port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("ImageioDaemon is not started")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        """Start the daemon and wait until its control service answers."""
        if self._proc is not None:
            raise RuntimeError("ImageioDaemon is already running")
        self._dir = Path(tempfile.mkdtemp(prefix="tessera-imageio-", dir=self.base_dir))
        try:
            (self._dir / "conf.d").mkdir()
            (self._dir / "run").mkdir()
            (self._dir / "pki").mkdir()
            self._tls = self.ca.issue(self._dir / "pki", "imageio")
            (self._dir / "conf.d" / "99-tessera-lab.conf").write_text(
                _config(self._dir, self.remove_timeout, self._tls)
            )
            # Output before logging is configured (bad config, import errors) goes here; a
            # file, because a pipe nobody drains would block the daemon when full.
            with open(self._dir / "output", "wb") as output:
                self._proc = await asyncio.create_subprocess_exec(
                    self.python,
                    "-c",
                    _MAIN,
                    "--conf-dir",
                    str(self._dir),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    cwd=self._dir,
                )
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT)
            )
            await self._wait_ready(self._proc)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        delay = POLL_FIRST
        while True:
            if proc.returncode is not None:
                raise ImageioDaemonError(
                    path=self.directory,
                    reason=f"exited with status {proc.returncode} before serving: "
                    f"{self._log_tail()}",
                )
            if self._read_ports() and await self._control_answers():
                return
            if loop.time() >= deadline:
                raise ImageioDaemonError(
                    path=self.directory,
                    reason=f"not ready within {START_TIMEOUT:.0f} s: {self._log_tail()}",
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await proc.wait()  # wakes early if the daemon exits
            delay = min(delay * 2, POLL_MAX)

    def _read_ports(self) -> bool:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return False
        if _READY not in text:
            return False
        for service, _host, port in _LISTENING.findall(text):
            if service == "remote":
                self._remote_port = int(port)
            else:
                self._control_port = int(port)
        return self._remote_port is not None and self._control_port is not None

    async def _control_answers(self) -> bool:
        try:
            async with self._http().get(f"{self.control_url}/tickets/readiness-probe") as resp:
                return resp.status == 404
        except aiohttp.ClientConnectionError:
            return False

    def _log_tail(self) -> str:
        parts = []
        for name in ("output", "daemon.log"):
            try:
                text = (self.directory / name).read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"{name}: {text[-LOG_TAIL:]}")
        return "\n".join(parts) or "(no output)"

    async def stop(self) -> None:
        """Terminate the daemon (SIGKILL after ``STOP_TIMEOUT``), reap it, remove its directory.

        Idempotent. Clients still connected see their connections closed.
        """
        proc, self._proc = self._proc, None
        session, self._session = self._session, None
        try:
            if session is not None:
                await session.close()
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await proc.wait()
        finally:
            try:
                if proc is not None:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                    await proc.wait()
            finally:
                self._remote_port = self._control_port = None
                self._tls = None
                if self._dir is not None and not self.keep_dir:
                    shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- URLs ------------------------------------------------------------------------------

    @property
    def remote_port(self) -> int:
        if self._remote_port is None:
            raise RuntimeError("ImageioDaemon is not running")
        return self._remote_port

    @property
    def control_url(self) -> str:
        if self._control_port is None:
            raise RuntimeError("ImageioDaemon is not running")
        return f"http://127.0.0.1:{self._control_port}"

    def data_url(self, ticket: str) -> str:
        """The transfer URL of ``ticket`` (what the engine reports as ``transfer_url``)."""
        return f"https://127.0.0.1:{self.remote_port}/images/{ticket}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that verifies ``data_url``: the lab's engine CA."""
        if self._tls is None:
            raise RuntimeError("ImageioDaemon is not running")
        return self._tls.ca_file

    # -- control API -----------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ImageioDaemon is not running")
        return self._session

    async def _request(
        self, method: str, ticket: str, expect: int, json: object = None
    ) -> aiohttp.ClientResponse:
        """One control request; returns the response with its body read."""
        url = f"{self.control_url}/tickets/{ticket}"
        try:
            async with self._http().request(method, url, json=json) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ImageioControlError(
                method=method, ticket=ticket, status="(none)", reason=f"{type(e).__name__}: {e}"
            ) from e
        if resp.status != expect:
            raise ImageioControlError(
                method=method,
                ticket=ticket,
                status=resp.status,
                reason=body.decode("utf-8", errors="replace").strip() or resp.reason,
            )
        return resp

    async def add_ticket(
        self,
        ticket_id: str,
        url: str,
        size: int,
        ops: list[str],
        *,
        dirty: bool = False,
        timeout: int = 300,
        transfer_id: str | None = None,
        sparse: bool = True,
        inactivity_timeout: int | None = None,
    ) -> None:
        """Install a ticket as vdsm does for an image transfer (``PUT /tickets/<id>``).

        ``url`` is the backend (``nbd:unix:/path.sock``, ``file:///path``); ``ops`` is
        ``["read"]`` for a download, ``["write"]`` for an upload; ``dirty`` allows
        ``/extents?context=dirty`` (the export must carry a dirty bitmap)."""
        ticket: dict[str, Any] = {
            "uuid": ticket_id,
            "url": url,
            "size": size,
            "ops": list(ops),
            "timeout": timeout,
            "sparse": sparse,
            "dirty": dirty,
            "transfer_id": transfer_id if transfer_id is not None else ticket_id,
        }
        if inactivity_timeout is not None:
            ticket["inactivity_timeout"] = inactivity_timeout
        await self._request("PUT", ticket_id, 200, json=ticket)

    async def extend_ticket(self, ticket_id: str, timeout: int) -> None:
        """Make the ticket expire ``timeout`` seconds from now (``PATCH /tickets/<id>``)."""
        await self._request("PATCH", ticket_id, 200, json={"timeout": timeout})

    async def get_ticket(self, ticket_id: str) -> dict[str, Any]:
        """The ticket's status (``active``, ``transferred``, ``expires``…).

        A missing ticket raises ``ImageioControlError`` with status 404."""
        url = f"{self.control_url}/tickets/{ticket_id}"
        try:
            async with self._http().get(url) as resp:
                if resp.status != 200:
                    body = await resp.text(errors="replace")
                    raise ImageioControlError(
                        method="GET", ticket=ticket_id, status=resp.status, reason=body.strip()
                    )
                data = await resp.json()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ImageioControlError(
                method="GET", ticket=ticket_id, status="(none)", reason=f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(data, dict):
            raise ImageioControlError(
                method="GET", ticket=ticket_id, status=200, reason=f"not an object: {data!r}"
            )
        return data

    async def remove_ticket(self, ticket_id: str) -> None:
        """Remove the ticket (``DELETE /tickets/<id>``); a missing ticket is not an error.

        The daemon answers 409 while operations on the ticket are still running after its
        ``remove_timeout``; this retries until ``REMOVE_DEADLINE``, then raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_DEADLINE
        while True:
            try:
                await self._request("DELETE", ticket_id, 204)
            except ImageioControlError as e:
                if e.fields.get("status") != 409 or loop.time() >= deadline:
                    raise
            else:
                return
