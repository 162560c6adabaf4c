"""TLS for NBD exports: the server's certificate and key, the CA that signs client
certificates (mutual TLS, optional), and the ``ssl`` context made from them.

The files may be named one by one or found in one directory laid out as qemu-nbd
(``--object tls-creds-x509,dir=DIR,endpoint=server``) and libnbd expect them::

    DIR/server-cert.pem   the server's certificate (with its chain, if any)
    DIR/server-key.pem    its private key (unencrypted: the export runs unattended)
    DIR/ca-cert.pem       if present: clients must present a certificate signed by it,
                          as qemu-nbd does by default (verify-peer=on)

Clients are told which CA signed the server's certificate out of band (libnbd's
``nbds://HOST:PORT/?tls-certificates=DIR``, qemu's ``tls-creds-x509,endpoint=client``).
TLS 1.2 is the minimum (the NBD spec: MUST support 1.2, SHOULD NOT allow older by default).
"""

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.core.errors import ConfigError

CA_CERT: Final = "ca-cert.pem"
SERVER_CERT: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"


class TlsFilesError(ConfigError):
    """A certificate, key or CA file of an export cannot be used."""

    template = "NBD TLS: {path}: {reason}"


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The files of a TLS server. ``ca``: verify client certificates against it (mutual
    TLS); None: any client that completes the handshake may connect."""

    cert: Path
    key: Path
    ca: Path | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> "ServerTls":
        """The qemu/libnbd layout (module docstring). Raises TlsFilesError when the
        directory lacks the certificate or the key."""
        for name in (SERVER_CERT, SERVER_KEY):
            if not (directory / name).is_file():
                raise TlsFilesError(path=directory / name, reason="no such file")
        ca = directory / CA_CERT
        return cls(directory / SERVER_CERT, directory / SERVER_KEY, ca if ca.exists() else None)

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def context(self) -> ssl.SSLContext:
        """A server-side context; raises TlsFilesError when a file cannot be read or the key
        does not match the certificate. Made once per listener, shared by its connections."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise TlsFilesError(path=f"{self.cert}, {self.key}", reason=_reason(e)) from e
        if self.ca is not None:
            try:
                context.load_verify_locations(cafile=self.ca)
            except (OSError, ssl.SSLError) as e:
                raise TlsFilesError(path=self.ca, reason=_reason(e)) from e
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def _reason(e: OSError | ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)  # "KEY_VALUES_MISMATCH", "PEM_LIB", ...
    return e.strerror or str(e)
