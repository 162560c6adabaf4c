"""The lab's certificate authority: one throw-away CA per lab, made when the lab starts.

A real engine runs its own CA (``/etc/pki/ovirt-engine/ca.pem``): it signs the engine's HTTPS
certificate and every host's ovirt-imageio certificate, and the engine publishes it at
``/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA``. The lab
does the same with ``LabCa``: the fake engine and the lab's imageio daemon each get a server
certificate from the same CA, so a client that trusts the engine CA trusts both, and a
client that trusts nothing else fails on both::

    ca = LabCa()                                  # key in memory only, never written
    engine_tls = ca.issue(engine_dir)             # ca.pem, server.pem, server-key.pem
    imageio_tls = ca.issue(imageio_dir, "imageio")

The SDK verifies the peer and the host name (libcurl ``SSL_VERIFYHOST=2``) unless told
``insecure=True``, so server certificates carry ``IP:127.0.0.1`` and ``DNS:localhost`` in their
SAN. EC P-256 keys keep generation in the milliseconds.
"""

import datetime
import ssl
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=7)  # a lab lives for a session; a week covers clock skew


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: Path  # give this to ovirtsdk4.Connection(ca_file=...) and to imageio clients
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)


class LabCa:
    """A CA whose private key lives only in this object; ``issue`` signs server certificates.

    ``pem`` is the CA certificate (what the engine's pki-resource serves)."""

    def __init__(self) -> None:
        now = _now()
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = _name("Tessera lab CA")
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem: bytes = self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, directory: Path, name: str = "server") -> TlsFiles:
        """Write ``ca.pem``, ``<name>.pem`` and ``<name>-key.pem`` (mode 0600) into
        ``directory``: a new key and a certificate for 127.0.0.1 and localhost.

        The directory must exist; existing files of those names are replaced."""
        now = _now()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("127.0.0.1"))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )
        files = TlsFiles(
            directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem"
        )
        files.ca_file.write_bytes(self.pem)
        files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key_file.touch(mode=0o600)
        files.key_file.chmod(0o600)
        files.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return files
