"""The lab's real ovirt-imageio daemon: control API, data API over qemu-nbd, clean stop.

The image is a qcow2 written with qemu-io, served read-only by qemu-nbd with a persistent
dirty bitmap exported, and registered as a ticket with an ``nbd:unix:<socket>`` URL as vdsm
does; requests use plain aiohttp so these tests check the daemon, not Tessera's client. The
data service speaks TLS only, with a certificate from the lab's CA (``daemon.ca_file``).
"""

import asyncio
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from engine.core.units import KiB, MiB
from engine.io.qemu import QemuNbd
from plugins.lab.imageio import ImageioControlError, ImageioDaemon
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

SIZE = 4 * MiB
TICKET = "6f1c2b3a-0000-4000-8000-000000000001"


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    before = leaks.children()
    yield
    assert leaks.children() <= before


async def run(*argv: str | Path | int) -> None:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"


async def make_image(tmp_path: Path) -> Path:
    """1 MiB of 0xaa at 0, then a bitmap ``b1``, then 64 KiB of 0xbb at 2 MiB (dirty)."""
    image = tmp_path / "disk.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", image, SIZE)
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xaa 0 {MiB}", image)
    await run("qemu-img", "bitmap", "--add", "-f", "qcow2", image, "b1")
    await run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xbb {2 * MiB} {64 * KiB}", image)
    return image


async def test_tickets_and_data_over_qemu_nbd(tmp_path: Path) -> None:
    image = await make_image(tmp_path)
    async with (
        QemuNbd(image, "qcow2", read_only=True, bitmap="b1") as nbd,
        ImageioDaemon(tmp_path) as daemon,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=daemon.ca_file))
        ) as http,
    ):
        url = f"nbd:unix:{nbd.address}"
        await daemon.add_ticket(TICKET, url, SIZE, ["read"], dirty=True, transfer_id="tr-1")

        ticket = await daemon.get_ticket(TICKET)
        assert ticket["uuid"] == TICKET
        assert ticket["url"] == url
        assert ticket["size"] == SIZE
        assert ticket["ops"] == ["read"]
        assert ticket["dirty"] is True
        assert ticket["transfer_id"] == "tr-1"
        assert ticket["timeout"] == 300

        # Extending moves the expiry (monotonic seconds), not the original timeout.
        await daemon.extend_ticket(TICKET, 600)
        assert (await daemon.get_ticket(TICKET))["expires"] >= ticket["expires"] + 300

        data_url = daemon.data_url(TICKET)
        assert data_url == f"https://127.0.0.1:{daemon.remote_port}/images/{TICKET}"
        # TLS only: plain http gets no HTTP answer, and only the lab CA verifies the daemon.
        with pytest.raises(aiohttp.ClientError):
            async with http.options(data_url.replace("https:", "http:", 1)):
                pass
        async with aiohttp.ClientSession() as system_cas:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with system_cas.options(data_url):
                    pass

        async with http.options(data_url) as resp:
            assert resp.status == 200
            assert set(resp.headers["Allow"].split(",")) == {"OPTIONS", "GET"}
            options = await resp.json()
        assert "extents" in options["features"]
        assert "unix_socket" not in options  # the local service is off
        assert options["max_readers"] == 8

        headers = {"Range": f"bytes={MiB - 4}-{MiB + 3}"}
        async with http.get(data_url, headers=headers) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {MiB - 4}-{MiB + 3}/{SIZE}"
            assert await resp.read() == b"\xaa" * 4 + b"\0" * 4

        async with http.get(f"{data_url}/extents", params={"context": "dirty"}) as resp:
            assert resp.status == 200
            dirty = [(e["start"], e["length"]) for e in await resp.json() if e["dirty"]]
        assert dirty == [(2 * MiB, 64 * KiB)]

        async with http.get(f"{data_url}/extents", params={"context": "zero"}) as resp:
            zero = [(e["start"], e["length"], e["zero"]) for e in await resp.json()]
        assert zero[0] == (0, MiB, False)
        assert sum(length for _, length, _ in zero) == SIZE

        await daemon.remove_ticket(TICKET)
        await daemon.remove_ticket(TICKET)  # idempotent
        with pytest.raises(ImageioControlError, match="HTTP 404"):
            await daemon.get_ticket(TICKET)
        async with http.get(data_url, headers=headers) as resp:
            assert resp.status == 403
        pid = daemon.pid
        assert pid is not None
        directory = daemon.directory

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped
    assert not directory.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["disk.qcow2"]


async def test_invalid_ticket_is_refused_with_the_reason(tmp_path: Path) -> None:
    async with ImageioDaemon(tmp_path) as daemon:
        with pytest.raises(ImageioControlError, match=r"PUT ticket t1: HTTP 400: .*scheme"):
            await daemon.add_ticket("t1", "gopher://x", MiB, ["read"])


async def test_start_failure_quotes_the_output_and_cleans_up(tmp_path: Path) -> None:
    daemon = ImageioDaemon(tmp_path, python="/bin/false")
    with pytest.raises(Exception, match="exited with status 1"):
        await daemon.start()
    assert list(tmp_path.iterdir()) == []
    assert daemon.pid is None
