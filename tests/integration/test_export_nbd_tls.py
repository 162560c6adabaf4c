"""``tessera export`` over TLS, against NBD clients nobody here wrote: libnbd (nbdinfo,
nbdcopy) with ``nbds://...?tls-certificates=DIR`` and qemu (qemu-img convert and compare)
with ``--object tls-creds-x509,...,endpoint=client``; certificates in the directory layout
both read (``tests/nbd_tls.py``).

What must hold: every byte read through TLS equals ``tessera restore`` and the image; a
client in clear is told TLS is required and gets nothing; with a CA given, a client whose
certificate that CA did not sign, or that has none, is refused, and the server goes on
serving the others; a client that does not trust the server's certificate refuses it; TCP
off loopback in clear needs ``--no-tls``.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.images import identical, run
from tests.integration.test_export_nbd import backed_up, exported, ok, tessera
from tests.nbd_tls import NbdTls, make_nbd_tls

pytestmark = pytest.mark.integration

__all__ = ["backed_up"]  # the fixture, shared with the plain export tests


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> NbdTls:
    return make_nbd_tls(tmp_path_factory.mktemp("nbd-tls"))


def with_certs(uri: str, directory: Path) -> str:
    return f"{uri}?tls-certificates={directory}"


def qemu_tls(uri: str, directory: Path) -> list[str]:
    """qemu-img arguments opening ``nbds://HOST:PORT/`` as an --image-opts image ``tls0``."""
    host, _, port = uri.removeprefix("nbds://").rstrip("/").rpartition(":")
    return [
        "--object",
        f"tls-creds-x509,id=tls0,dir={directory},endpoint=client",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host={host},server.port={port},tls-creds=tls0",
    ]


def fails(*argv: str | Path) -> str:
    """Runs a client that must fail; its stderr (libnbd's debug log included)."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout
    return proc.stderr


def test_nbdinfo_nbdcopy_and_qemu_over_tls_equal_the_restore(
    backed_up: dict[str, Path | str], certs: NbdTls, tmp_path: Path
) -> None:
    restored = tmp_path / "restored.raw"
    ok(
        "restore",
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--to",
        restored,
        "--format",
        "raw",
    )
    with exported(
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--listen",
        "127.0.0.1:0",
        "--tls-dir",
        certs.server,
    ) as export:
        assert export.uri.startswith("nbds://127.0.0.1:")
        info = json.loads(run("nbdinfo", "--json", with_certs(export.uri, certs.client)))
        assert info["TLS"] is True
        assert info["exports"][0]["export-size"] == 112 * 1024 * 1024
        copy = tmp_path / "copy.raw"
        run("nbdcopy", "--connections=4", with_certs(export.uri, certs.client), copy)
        assert identical(copy, restored)
        converted = tmp_path / "converted.raw"
        run("qemu-img", "convert", *qemu_tls(export.uri, certs.client), "-O", "raw", converted)
        assert identical(converted, restored)
        image = f"driver=qcow2,file.filename={backed_up['image']}"
        run("qemu-img", "compare", *qemu_tls(export.uri, certs.client), image)
        err = export.stop()
    assert "read-only, TLS with client certificates" in err
    assert identical(restored, Path(backed_up["image"]))


def test_clients_in_clear_or_without_a_trusted_certificate_are_refused(
    backed_up: dict[str, Path | str], certs: NbdTls, tmp_path: Path
) -> None:
    with exported(
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--listen",
        "127.0.0.1:0",
        "--tls-dir",
        certs.server,
    ) as export:
        plain = export.uri.replace("nbds://", "nbd://")
        assert "TLS required" in fails("nbdinfo", plain)
        qemu_plain = fails("qemu-img", "info", "-f", "raw", plain)
        assert "TLS required" in qemu_plain or "TLS negotiation required" in qemu_plain
        # Another CA's client certificate, and none at all: the server ends the handshake.
        for client in (certs.stranger, certs.anonymous):
            err = fails("nbdinfo", with_certs(export.uri, client))
            assert "gnutls" in err and "export-size" not in err
        # The client does not trust the server: libnbd and qemu refuse it themselves.
        err = fails("nbdinfo", with_certs(export.uri, certs.distrustful))
        assert "certificate verification" in err.lower() or "gnutls_handshake" in err
        err = fails("qemu-img", "info", *qemu_tls(export.uri, certs.distrustful))
        assert "certificate" in err
        # Refused clients did not stop the server.
        copy = tmp_path / "copy.raw"
        run("nbdcopy", with_certs(export.uri, certs.client), copy)
        assert identical(copy, Path(backed_up["raw"]))


def test_server_without_a_ca_takes_clients_without_certificates(
    backed_up: dict[str, Path | str], certs: NbdTls
) -> None:
    cert, key = certs.server / "server-cert.pem", certs.server / "server-key.pem"
    with exported(
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ) as export:
        info = json.loads(run("nbdinfo", "--json", with_certs(export.uri, certs.anonymous)))
        assert info["TLS"] is True
        run(
            "qemu-img",
            "compare",
            *qemu_tls(export.uri, certs.anonymous),
            f"driver=raw,file.filename={backed_up['raw']}",
        )
        err = export.stop()
    assert "read-only, TLS\n" in err


def test_tcp_off_loopback_in_clear_needs_no_tls(backed_up: dict[str, Path | str]) -> None:
    proc = tessera(
        "export", backed_up["id"], "--store", backed_up["store"], "--listen", "0.0.0.0:0"
    )
    assert proc.returncode == 2
    assert "not a loopback address and the export would be served in clear" in proc.stderr
    with exported(
        backed_up["id"], "--store", backed_up["store"], "--listen", "0.0.0.0:0", "--no-tls"
    ) as export:
        port = export.uri.rstrip("/").rpartition(":")[2]
        info = json.loads(run("nbdinfo", "--json", f"nbd://127.0.0.1:{port}/"))
        assert info["TLS"] is False


def test_tls_on_a_unix_socket_prints_nbds_unix(
    backed_up: dict[str, Path | str], certs: NbdTls, tmp_path: Path
) -> None:
    sock = tmp_path / "s.sock"
    with exported(
        backed_up["id"], "--store", backed_up["store"], "--socket", sock, "--tls-dir", certs.server
    ) as export:
        assert export.uri == f"nbds+unix:///?socket={sock}"
        copy = tmp_path / "copy.raw"
        run("nbdcopy", f"{export.uri}&tls-certificates={certs.client}", copy)
        assert identical(copy, Path(backed_up["raw"]))
        assert "TLS required" in fails("nbdinfo", f"nbd+unix:///?socket={sock}")
