"""The engine CA: what Tessera trusts when it talks TLS to ovirt-imageio.

Every ovirt-imageio daemon (on the hosts) and the imageio proxy (on the engine) presents a
certificate issued by the engine's own CA, the one the engine publishes at
``/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA``. The
system's CA store does not know it, so without it every imageio read and write fails its
certificate check. ``load_engine_ca`` finds it:

1. the engine section's ``ca_file`` when configured: the file the SDK already verifies the
   engine with, which on a default installation is exactly this CA;
2. otherwise the engine's pki-resource, fetched over ``https`` verified by the system's CAs
   (host name included), as the SDK verifies the engine when ``ca_file`` is absent.

Why (2) is safe: it is not trust on first use. The CA comes from the engine Tessera already
verified and already sends the backup user's password to; whoever could substitute it could
equally answer the API itself. It is fetched again by each ``EngineClient`` (kept in memory,
never written), so a renewed engine CA is picked up at the next job. An engine URL that is not
``https`` (nothing verified) is refused with ``EngineCaError``: a CA fetched over plain HTTP
would let anyone on the path read and rewrite every disk. Configure ``ca_file`` then.

Errors: ``EngineCaError`` (a ``ConfigError``: the file is unreadable or not a PEM
certificate, the engine URL is plain http, the engine answers 4xx or not a certificate);
``EngineCaUnavailable`` (a ``TransientError``: the engine cannot be reached or answers 5xx).
"""

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from engine.core.errors import ConfigError, TransientError

PKI_PATH: Final = "/ovirt-engine/services/pki-resource"
PKI_QUERY: Final = {"resource": "ca-certificate", "format": "X509-PEM-CA"}
# One small GET to the engine; as long as one API request may take (client.REQUEST_TIMEOUT).
FETCH_TIMEOUT: Final = 60.0
# A CA certificate is a few KiB; a bundle of several is still far below this.
MAX_PEM: Final = 1024 * 1024
_PEM_BEGIN: Final = "-----BEGIN CERTIFICATE-----"


class EngineCaError(ConfigError):
    """The engine CA cannot be had: a configuration to fix, not a moment to wait out."""

    template = "engine CA for imageio from {source}: {reason}"


class EngineCaUnavailable(TransientError):
    """The engine did not answer the CA request (connection failure, timeout, 5xx)."""

    template = "engine CA for imageio from {source}: engine unavailable: {reason}"


@dataclass(frozen=True, slots=True)
class EngineCa:
    """The engine CA in PEM and where it came from (``source``, a path or URL, named in
    every TLS error so an operator knows which CA did not match)."""

    pem: str
    source: str

    def context(self) -> ssl.SSLContext:
        """A client context trusting this CA only (not the system's), host names checked."""
        return ssl.create_default_context(cadata=self.pem)

    @classmethod
    def parse(cls, pem: str, source: str) -> "EngineCa":
        """Check that ``pem`` holds at least one certificate OpenSSL accepts."""
        if _PEM_BEGIN not in pem:
            raise EngineCaError(source=source, reason="not a PEM certificate")
        try:
            ssl.create_default_context(cadata=pem)
        except (ssl.SSLError, ValueError) as e:
            raise EngineCaError(source=source, reason=f"bad PEM certificate: {e}") from None
        return cls(pem, source)

    @classmethod
    def from_file(cls, path: Path | str) -> "EngineCa":
        try:
            pem = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise EngineCaError(source=str(path), reason=f"cannot read: {e}") from None
        return cls.parse(pem, str(path))


def pki_url(api_url: str) -> str:
    """The engine's CA certificate URL, on the scheme and host of its API URL."""
    parts = urlsplit(api_url)
    return urlunsplit((parts.scheme, parts.netloc, PKI_PATH, urlencode(PKI_QUERY), ""))


async def fetch_engine_ca(api_url: str, *, timeout: float = FETCH_TIMEOUT) -> EngineCa:
    """GET the engine's pki-resource over https verified by the system's CAs."""
    url = pki_url(api_url)
    if urlsplit(url).scheme != "https":
        raise EngineCaError(
            source=url,
            reason="the engine is reached over plain http, so a CA fetched from it proves "
            "nothing; set ca_file in the engine section (the engine's "
            "/etc/pki/ovirt-engine/ca.pem)",
        )
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context())
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session,
            session.get(url) as resp,
        ):
            body = await resp.content.read(MAX_PEM + 1)
            status = resp.status
    except aiohttp.ClientSSLError as e:
        raise EngineCaError(
            source=url, reason=f"the engine's certificate is not trusted by the system: {e}"
        ) from e
    except (aiohttp.ClientError, TimeoutError) as e:
        raise EngineCaUnavailable(source=url, reason=f"{type(e).__name__}: {e}") from e
    if status >= 500:
        raise EngineCaUnavailable(source=url, reason=f"HTTP {status}")
    if status != 200:
        raise EngineCaError(source=url, reason=f"HTTP {status}")
    if len(body) > MAX_PEM:
        raise EngineCaError(source=url, reason=f"answer larger than {MAX_PEM} bytes")
    return EngineCa.parse(body.decode("ascii", errors="replace"), url)


async def load_engine_ca(api_url: str, ca_file: Path | None) -> EngineCa:
    """The configured ``ca_file``, else the CA the engine at ``api_url`` publishes."""
    if ca_file is not None:
        return EngineCa.from_file(ca_file)
    return await fetch_engine_ca(api_url)
