"""The repository's NBD client over TLS against a server it did not write: qemu-nbd with
``--tls-creds`` (``tls-creds-x509,endpoint=server``; client certificates required, qemu's
default), certificates from ``tests/nbd_tls.py``.

What must hold: after STARTTLS every byte reads as the image; a client in clear is refused
by qemu-nbd; a client whose CA did not sign qemu-nbd's certificate fails the TLS handshake.
"""

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.io.nbd import connect
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import NbdConnectionError, NbdOptionError
from tests.nbd_tls import NbdTls, make_nbd_tls

pytestmark = pytest.mark.integration

SIZE = 3 << 20


@pytest.fixture
def qemu_nbd_tls(tmp_path: Path) -> Iterator[tuple[Path, Path, NbdTls]]:
    """qemu-nbd serving a raw image read-only on a unix socket, TLS required."""
    certs = make_nbd_tls(tmp_path / "certs")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(SIZE // 2))
    os.truncate(image, SIZE)  # a hole: block status says so
    sock, pid_file = tmp_path / "nbd.sock", tmp_path / "nbd.pid"
    subprocess.run(
        [
            "qemu-nbd",
            "--fork",  # returns once the socket listens
            f"--pid-file={pid_file}",
            "--persistent",
            f"--socket={sock}",
            "--format=raw",
            "--read-only",
            "--object",
            f"tls-creds-x509,id=tls0,dir={certs.server},endpoint=server",
            "--tls-creds=tls0",
            str(image),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    pid = int(pid_file.read_text())
    try:
        yield sock, image, certs
    finally:
        os.kill(pid, signal.SIGTERM)


async def test_client_reads_through_tls_from_qemu_nbd(
    qemu_nbd_tls: tuple[Path, Path, NbdTls],
) -> None:
    sock, image, certs = qemu_nbd_tls
    context = certs.client_context(certs.client)
    async with await connect(sock, tls=context, server_hostname="localhost") as client:
        assert client.export_size == SIZE
        assert await client.read(0, SIZE) == image.read_bytes()
        status = await client.block_status(0, SIZE, p.BASE_ALLOCATION)
        assert status[-1].zero and status[-1].end == SIZE


async def test_qemu_nbd_refuses_clients_in_clear_and_we_refuse_a_stranger_server(
    qemu_nbd_tls: tuple[Path, Path, NbdTls],
) -> None:
    sock, _, certs = qemu_nbd_tls
    with pytest.raises(NbdOptionError, match="TLS required"):
        await connect(sock)
    distrustful = certs.client_context(certs.distrustful)
    with pytest.raises(NbdConnectionError, match="TLS handshake failed"):
        await connect(sock, tls=distrustful, server_hostname="localhost")
