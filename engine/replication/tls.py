"""Mutual TLS between sites: a private CA, site certificates, and the ssl contexts.

Each site gets a key and a certificate signed by one CA that only the operator's sites
share (``tessera peer init-ca`` / ``tessera peer issue``). The receiver requires a client
certificate signed by that CA (``CERT_REQUIRED``): a client without one is refused during the
TLS handshake, before any HTTP. The sender checks the receiver's certificate against the
same CA and its name (SAN) against the URL's host.
"""

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine.core.errors import ConfigError

CA_DAYS: Final = 3650
SITE_DAYS: Final = 825  # the longest validity browsers accepted; renew with `peer issue`
CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"


@dataclass(frozen=True)
class SiteFiles:
    cert: Path
    key: Path
    ca: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise ConfigError(message=f"{path} exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(directory: Path, name: str = "Tessera peers CA") -> Path:
    """Create ``ca.key`` (0600) and ``ca.crt`` in ``directory``; returns the cert path."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(directory / CA_KEY, _key_pem(key), private=True)
    _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return directory / CA_CERT


def issue(
    ca_dir: Path, name: str, out: Path, dns: list[str] | None = None, ips: list[str] | None = None
) -> SiteFiles:
    """A key and certificate for site ``name`` signed by the CA in ``ca_dir``, usable as
    both TLS server and client; SANs: ``dns`` names (default: ``name``) and ``ips``.
    Writes ``out/<name>.key``, ``out/<name>.crt`` and a copy of ``out/ca.crt``."""
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(message=f"CA in {ca_dir}: {e}") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(message=f"CA key in {ca_dir} is not an EC key")
    try:
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in (dns or [name])]
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
    except ValueError as e:
        raise ConfigError(message=f"peer issue: {e}") from e
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SITE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = SiteFiles(cert=out / f"{name}.crt", key=out / f"{name}.key", ca=out / CA_CERT)
    _write(files.key, _key_pem(key), private=True)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    if not files.ca.exists():
        _write(files.ca, (ca_dir / CA_CERT).read_bytes(), private=False)
    return files


def _context(purpose: ssl.Purpose, cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(purpose, cafile=str(ca))
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(message=f"TLS files {cert}, {key}, {ca}: {e}") from e
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The receiver's context: a client certificate signed by ``ca`` is required."""
    context = _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The sender's context: presents its certificate, checks the receiver's name."""
    context = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context
