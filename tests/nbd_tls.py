"""Certificate directories for NBD over TLS, in the layout qemu and libnbd read
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``),
made with the replication layer's CA helpers (``engine.replication.tls``): EC P-256, a server
certificate for 127.0.0.1 and localhost, client certificates from the same CA or another one.

::

    server/        ca-cert.pem (CA)  server-cert.pem server-key.pem    mutual TLS
    server-open/                     server-cert.pem server-key.pem    no client certificates
    client/        ca-cert.pem (CA)  client-cert.pem client-key.pem    trusted both ways
    anonymous/     ca-cert.pem (CA)                                    trusts the server only
    stranger/      ca-cert.pem (CA)  client-cert.pem client-key.pem    signed by the other CA
    distrustful/   ca-cert.pem (other CA)                              refuses the server
"""

import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from engine.replication import tls


@dataclass(frozen=True)
class NbdTls:
    server: Path
    server_open: Path
    client: Path
    anonymous: Path
    stranger: Path
    distrustful: Path

    def client_context(self, directory: Path) -> ssl.SSLContext:
        """An ssl client context from one of the client directories (for this repository's
        tests that speak TLS themselves)."""
        context = ssl.create_default_context(cafile=str(directory / "ca-cert.pem"))
        if (directory / "client-cert.pem").exists():
            context.load_cert_chain(directory / "client-cert.pem", directory / "client-key.pem")
        return context


def make_nbd_tls(root: Path) -> NbdTls:
    ca, other_ca = root / "ca", root / "other-ca"
    tls.init_ca(ca)
    tls.init_ca(other_ca, "Some other CA")
    issued = root / "issued"
    server = tls.issue(ca, "server", issued, dns=["localhost"], ips=["127.0.0.1"])
    client = tls.issue(ca, "client", issued)
    stranger = tls.issue(other_ca, "stranger", root / "issued-other")

    def layout(name: str, ca_dir: Path | None, role: str, files: tls.SiteFiles | None) -> Path:
        directory = root / name
        directory.mkdir()
        if ca_dir is not None:
            shutil.copy(ca_dir / tls.CA_CERT, directory / "ca-cert.pem")
        if files is not None:
            shutil.copy(files.cert, directory / f"{role}-cert.pem")
            shutil.copy(files.key, directory / f"{role}-key.pem")
        return directory

    return NbdTls(
        server=layout("server", ca, "server", server),
        server_open=layout("server-open", None, "server", server),
        client=layout("client", ca, "client", client),
        anonymous=layout("anonymous", ca, "client", None),
        stranger=layout("stranger", ca, "client", stranger),
        distrustful=layout("distrustful", other_ca, "client", None),
    )
