"""``tessera check-config --deep``: everything the configuration names, tried for real,
one ``Check`` per item (``engine.sources.capabilities.Check``: item, status, detail, hint).

::

    deep_check(loaded)
      engines    the hypervisor plugin's ``check`` per engine: reachable, CA, credentials,
                 DataMover VM (when ``datamover`` names one or a policy uses the
                 snapshot-attach flow; else only tried, and skipped when not found)
      stores     each initialised and opened read-only with its passphrase and key file
      smtp       connect, EHLO, STARTTLS and login as configured; no mail is sent
      syslog     tcp/tls: connect (TLS verified); udp: one test notice, a refusal seen
      webhooks   connect to each URL's host (TLS verified); nothing is posted

Nothing is written anywhere: a store is opened for reading (no lock, no recovery), no mail
or webhook call is made (``tessera notify test`` sends those), only the UDP syslog check's
one test notice. Every item is bounded by
``CHECK_TIMEOUT``; the items run one after the other, in that order, so the report reads the
same each time. A failure is a ``Check``, never an exception.
"""

import asyncio
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from engine.app.stores import open_store
from engine.core.errors import EngineError
from engine.sources import registry
from engine.sources.capabilities import FAILED, OK, SKIPPED, Check
from engine.store.layout import StoreConfig

if TYPE_CHECKING:
    from engine.config.loader import LoadedConfig
    from engine.config.models import (
        SmtpSection,
        StoreSection,
        SyslogSection,
        WebhookSection,
    )

# Seconds one item may take (a connection, a login, a store open). A healthy target answers
# in well under a second; an unreachable host should not hold the report for a minute.
CHECK_TIMEOUT = 20.0
# How long a UDP syslog check waits for an ICMP refusal after its datagram.
UDP_REFUSAL_WAIT = 0.5
SMTPS_PORT = 465
# RFC 5424, facility user, severity notice: what a syslog server receives from a UDP check.
UDP_TEST_MESSAGE = b"<13>1 - - tessera - check - tessera check-config --deep: reachability test"


async def deep_check(loaded: "LoadedConfig") -> list[Check]:
    """Every item of the configuration, tried (module docstring)."""
    config = loaded.config
    checks: list[Check] = []
    attach = any(p.flow == "snapshot-attach" for p in loaded.policies)
    named = config.datamover.vm_name is not None or config.datamover.host_uuid is not None
    for engine in config.engines:
        checks += await _engine(engine, config.datamover, required=named or attach)
    for store in config.stores:
        checks.append(await _store(store))  # local files: not bounded (a thread cannot stop)
    if config.smtp is not None:
        smtp = config.smtp
        checks.append(await _bounded(f"smtp {smtp.host}:{smtp.port}", _smtp(smtp)))
    if config.syslog is not None:
        syslog = config.syslog
        item = f"syslog {syslog.protocol}://{syslog.host}:{syslog.effective_port}"
        checks.append(await _bounded(item, _syslog(syslog)))
    for hook in config.webhooks:
        checks.append(await _bounded(f"webhook {hook.name}", _webhook(hook)))
    return checks


async def _engine(engine: object, datamover: object, *, required: bool) -> list[Check]:
    name = getattr(engine, "name", "?")
    try:
        _, hypervisor = registry.hypervisor(engine)
    except EngineError as e:
        return [Check(f"engine {name}", FAILED, str(e), "install the engine's plugin")]
    checks = await hypervisor.check(engine, datamover)
    if required:
        return checks
    # Nothing names a DataMover and no policy attaches disks: not finding it is no failure.
    why = "not needed: no datamover.vm_name or host_uuid, no policy uses snapshot-attach"
    return [
        Check(c.item, SKIPPED, f"{why} ({c.detail})")
        if c.item.endswith("DataMover VM") and c.status == FAILED
        else c
        for c in checks
    ]


async def _bounded(item: str, check: Awaitable[Check]) -> Check:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await check
    except TimeoutError:
        return Check(
            item, FAILED, f"no answer in {CHECK_TIMEOUT:g} s", "is it reachable from here?"
        )


async def _store(section: "StoreSection") -> Check:
    item = f"store {section.name}"
    path = section.path
    try:
        config = await asyncio.to_thread(StoreConfig.load, path)
    except EngineError as e:
        hint = f"create it: tessera store init {path} --passphrase-file FILE"
        return Check(item, FAILED, str(e), hint)
    try:
        store = await asyncio.to_thread(
            open_store,
            path,
            passphrase_file=section.passphrase_file,
            key_file=section.key_file,
            writable=False,
            interactive=False,
        )
    except EngineError as e:
        hint = "passphrase_file (or $TESSERA_PASSPHRASE) and key_file must be the store's own"
        return Check(item, FAILED, str(e), hint)
    try:
        snapshots = len(store.catalog.entries())
    finally:
        store.close()
    detail = f"{path}: {config.encryption}, opened with its key; {snapshots} snapshots"
    return Check(item, OK, detail)


async def _smtp(section: "SmtpSection") -> Check:
    # Here, not at the top: aiosmtplib loads for this check only (issue 15).
    import aiosmtplib  # noqa: PLC0415

    item = f"smtp {section.host}:{section.port}"
    smtps = section.port == SMTPS_PORT
    client = aiosmtplib.SMTP(
        hostname=section.host,
        port=section.port,
        use_tls=smtps,
        start_tls=section.starttls and not smtps,
        timeout=CHECK_TIMEOUT,
    )
    try:
        await client.connect()
        done = ["connected"] + (["TLS"] if smtps else ["STARTTLS"] if section.starttls else [])
        if section.username is not None and section.password_file is not None:
            password = (await asyncio.to_thread(section.password_file.read_text)).rstrip("\r\n")
            await client.login(section.username, password)
            done.append(f"logged in as {section.username}")
        await client.quit()
    except (aiosmtplib.SMTPException, OSError) as e:
        client.close()
        hint = "is host:port right and the mail server reachable from this host?"
        if isinstance(e, aiosmtplib.SMTPAuthenticationError):
            hint = "check smtp.username and the password in smtp.password_file"
        return Check(item, FAILED, f"{type(e).__name__}: {e}", hint)
    return Check(item, OK, ", ".join(done) + "; no mail sent")


async def _syslog(section: "SyslogSection") -> Check:
    item = f"syslog {section.protocol}://{section.host}:{section.effective_port}"
    hint = "is the syslog server listening there, and the port open from this host?"
    try:
        if section.protocol == "udp":
            await _udp_probe(section.host, section.effective_port)
            detail = "no refusal; UDP is never acknowledged, so delivery is not proven"
        else:
            context = None
            if section.protocol == "tls":
                context = ssl.create_default_context(
                    cafile=str(section.ca_file) if section.ca_file else None
                )
            _, writer = await asyncio.open_connection(
                section.host, section.effective_port, ssl=context
            )
            writer.close()
            await writer.wait_closed()
            detail = "connected" + (" (TLS verified)" if context else "")
    except OSError as e:
        return Check(item, FAILED, f"{type(e).__name__}: {e}", hint)
    return Check(item, OK, detail)


async def _udp_probe(host: str, port: int) -> None:
    """One RFC 5424 notice saying it is a test (asyncio sends no empty datagram); an ICMP
    port-unreachable answer shows as ``ConnectionRefusedError`` on the connected socket."""
    loop = asyncio.get_running_loop()
    refused: asyncio.Future[OSError] = loop.create_future()

    class Probe(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            if not refused.done() and isinstance(exc, OSError):
                refused.set_result(exc)

    transport, _ = await loop.create_datagram_endpoint(Probe, remote_addr=(host, port))
    try:
        transport.sendto(UDP_TEST_MESSAGE)
        done, _ = await asyncio.wait((refused,), timeout=UDP_REFUSAL_WAIT)
        if done:
            raise refused.result()
    finally:
        transport.close()
        refused.cancel()


async def _webhook(section: "WebhookSection") -> Check:
    item = f"webhook {section.name}"
    try:
        url = section.url or (await asyncio.to_thread(_read_url, section.url_file))
    except OSError as e:
        return Check(item, FAILED, f"url_file: {e}", "fix url_file")
    parts = urlsplit(str(url))
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    context = None
    if https:
        context = ssl.create_default_context(
            cafile=str(section.ca_file) if section.ca_file else None
        )
    where = f"{parts.scheme}://{host}:{port}"  # never the path: it may be the secret
    try:
        _, writer = await asyncio.open_connection(host, port, ssl=context)
        writer.close()
        await writer.wait_closed()
    except OSError as e:
        hint = "is the URL right and the receiver reachable from this host?"
        if isinstance(e, ssl.SSLCertVerificationError):
            hint = "set the webhook's ca_file to the CA that issued the receiver's certificate"
        return Check(item, FAILED, f"{where}: {type(e).__name__}: {e}", hint)
    verified = " (TLS verified)" if https else ""
    return Check(item, OK, f"{where} connected{verified}; nothing posted")


def _read_url(path: Path | None) -> str:
    assert path is not None  # the model requires url or url_file
    return path.read_text(encoding="utf-8").strip()
