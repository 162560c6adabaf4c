"""Tessera's imageio client against the real ovirt-imageio daemon serving qemu-nbd exports.

References come from qemu itself: ``qemu-img convert -O raw`` for the bytes, ``qemu-img map``
for the allocation, ``qemu-img compare`` for what the writers produced.
"""

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from engine.core.errors import TransientError
from engine.core.extent import Extent
from engine.core.units import KiB, MiB
from engine.io.qemu import QemuNbd
from engine.sources.types import DiskReader, DiskWriter
from plugins.lab.imageio import ImageioDaemon
from plugins.lab.tls import LabCa
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.imageio import (
    ImageioDisk,
    ImageioError,
    ImageioReader,
    ImageioTicketGone,
    ImageioTlsError,
    ImageioTransientError,
)
from tests.unit.io import leaks

pytestmark = pytest.mark.integration

SIZE = 8 * MiB
SLOT = 256 * KiB
READ_TICKET = "0b7e4d52-1111-4000-8000-00000000000a"
WRITE_TICKET = "0b7e4d52-2222-4000-8000-00000000000b"


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every daemon and qemu-nbd a test started is reaped by its end (zombies count)."""
    before = leaks.children()
    yield
    assert leaks.children() <= before


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[ImageioDaemon]:
    async with ImageioDaemon(tmp_path) as d:
        yield d
    assert list(tmp_path.glob("tessera-imageio-*")) == []


def engine_ca(daemon: ImageioDaemon) -> EngineCa:
    """The CA that issued the daemon's certificate (what a real engine's CA is to imageio)."""
    return EngineCa.from_file(daemon.ca_file)


async def run(*argv: str | Path | int) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def qemu_io(image: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    await run(*args, image)


async def make_source(tmp_path: Path) -> Path:
    """Data at several places, a zeroed cluster run, and holes everywhere else."""
    image = tmp_path / "source.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", image, SIZE)
    await qemu_io(
        image,
        f"write -P 0x11 0 {MiB}",
        f"write -P 0x22 {2 * MiB + 4 * KiB} {300 * KiB}",
        f"write -z {4 * MiB} {128 * KiB}",
        f"write -P 0x33 {SIZE - 64 * KiB} {64 * KiB}",
    )
    return image


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_all(disk: ImageioDisk, readers: int) -> bytes:
    out = bytearray(SIZE)
    slots = list(range(0, SIZE, SLOT))

    async def worker(mine: list[int]) -> None:
        reader: DiskReader = await disk.open_reader()
        try:
            for offset in mine:
                with memoryview(out)[offset : offset + SLOT] as view:
                    await reader.readinto(offset, view)
        finally:
            await reader.close()

    async with asyncio.TaskGroup() as tg:
        for i in range(readers):
            tg.create_task(worker(slots[i::readers]))
    return bytes(out)


async def test_concurrent_readers_read_the_image(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    raw = tmp_path / "source.raw"
    await run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw)
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        async with await ImageioDisk.connect(
            daemon.data_url(READ_TICKET), ca=engine_ca(daemon)
        ) as disk:
            options = disk.cached_options
            assert options.max_readers == 8
            assert {"extents"} <= options.features
            assert await disk.size() == SIZE
            assert await read_all(disk, readers=4) == raw.read_bytes()
        await daemon.remove_ticket(READ_TICKET)


async def test_zero_extents_match_the_allocation(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    mapping = json.loads(await run("qemu-img", "map", "--output=json", image))
    expected: list[tuple[int, int, bool]] = []
    for m in mapping:
        if expected and expected[-1][2] == m["zero"]:
            start, length, zero = expected.pop()
            expected.append((start, length + m["length"], zero))
        else:
            expected.append((m["start"], m["length"], m["zero"]))
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        async with await ImageioDisk.connect(
            daemon.data_url(READ_TICKET), ca=engine_ca(daemon)
        ) as disk:
            extents = await disk.extents("zero", 0, SIZE)
            assert [(e.start, e.length, e.zero) for e in extents] == expected
            assert all(not e.dirty for e in extents)
            # hole is reported only with qemu-nbd --allocation-depth, which QemuNbd omits.

            # A window is clipped to its range; neighbours with equal flags stay merged.
            # qcow2 allocates 64 KiB clusters: the write at 2 MiB + 4 KiB allocated from 2 MiB.
            window = await disk.extents("zero", MiB - 4 * KiB, 2 * MiB)
            assert [(e.start, e.length, e.zero) for e in window] == [
                (MiB - 4 * KiB, 4 * KiB, False),
                (MiB, MiB, True),
                (2 * MiB, 320 * KiB, False),
                (2 * MiB + 320 * KiB, MiB - 324 * KiB, True),
            ]

            # Past the end is clipped to the disk.
            assert await disk.extents("zero", SIZE - 4 * KiB, MiB) == [
                Extent(SIZE - 4 * KiB, 4 * KiB)
            ]

            # The ticket was added without dirty=True: the daemon refuses, clearly.
            with pytest.raises(ImageioError, match=r"context=dirty.*HTTP 404.*dirty") as info:
                await disk.extents("dirty", 0, SIZE)
            assert not info.value.retryable
        await daemon.remove_ticket(READ_TICKET)


async def test_dirty_extents_are_exactly_the_writes(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    await run("qemu-img", "bitmap", "--add", "-f", "qcow2", image, "ckpt-1")
    # The bitmap's granularity is 64 KiB: writes aligned to it are tracked exactly.
    await qemu_io(
        image,
        f"write -P 0xcc {MiB} {64 * KiB}",
        f"write -z {3 * MiB} {128 * KiB}",
        f"write -P 0x11 {5 * MiB} {64 * KiB}",  # same bytes as before still count
        f"write -P 0xdd {6 * MiB} {64 * KiB}",
    )
    async with QemuNbd(image, "qcow2", read_only=True, bitmap="ckpt-1") as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"], dirty=True)
        async with await ImageioDisk.connect(
            daemon.data_url(READ_TICKET), ca=engine_ca(daemon)
        ) as disk:
            extents = await disk.extents("dirty", 0, SIZE)
            assert [(e.start, e.length) for e in extents if e.dirty] == [
                (MiB, 64 * KiB),
                (3 * MiB, 128 * KiB),
                (5 * MiB, 64 * KiB),
                (6 * MiB, 64 * KiB),
            ]
            assert all(not (e.zero or e.hole) for e in extents)
            assert sum(e.length for e in extents) == SIZE
            # Windows over the cached list, one clipped in the middle of a dirty run.
            assert await disk.extents("dirty", 3 * MiB + 64 * KiB, 128 * KiB) == [
                Extent(3 * MiB + 64 * KiB, 64 * KiB, dirty=True),
                Extent(3 * MiB + 128 * KiB, 64 * KiB),
            ]
        await daemon.remove_ticket(READ_TICKET)


async def test_removed_ticket_gives_a_clear_error(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        async with await ImageioDisk.connect(
            daemon.data_url(READ_TICKET), ca=engine_ca(daemon)
        ) as disk:
            reader = await disk.open_reader()
            try:
                buf = bytearray(4 * KiB)
                await reader.readinto(0, memoryview(buf))
                assert buf == b"\x11" * len(buf)
                await daemon.remove_ticket(READ_TICKET)
                with pytest.raises(ImageioTicketGone) as info:
                    await reader.readinto(8 * KiB, memoryview(buf))
            finally:
                await reader.close()
    message = str(info.value)
    assert "expired or was removed" in message
    assert "HTTP 403" in message
    assert "offset 8192" in message
    assert f"/images/{READ_TICKET[:8]}…" in message
    assert READ_TICKET not in message  # the ticket is a credential
    assert not info.value.retryable


async def test_writers_then_qemu_img_compare(tmp_path: Path, daemon: ImageioDaemon) -> None:
    source = await make_source(tmp_path)
    target = tmp_path / "target.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", target, SIZE)
    async with (
        QemuNbd(source, "qcow2", read_only=True) as src_nbd,
        QemuNbd(target, "qcow2") as dst_nbd,
    ):
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{src_nbd.address}", SIZE, ["read"])
        await daemon.add_ticket(WRITE_TICKET, f"nbd:unix:{dst_nbd.address}", SIZE, ["write"])
        async with (
            await ImageioDisk.connect(daemon.data_url(READ_TICKET), ca=engine_ca(daemon)) as src,
            await ImageioDisk.connect(daemon.data_url(WRITE_TICKET), ca=engine_ca(daemon)) as dst,
        ):
            assert {"zero", "flush"} <= dst.cached_options.features
            with pytest.raises(ImageioError, match="does not allow writing"):
                await src.open_writer()

            extents = await src.extents("zero", 0, SIZE)

            async def copy(mine: list[Extent]) -> None:
                reader = await src.open_reader()
                writer: DiskWriter = await dst.open_writer()
                try:
                    # Garbage first, so the zeroes below must really be written.
                    await writer.write(mine[0].start, b"\xff" * min(mine[0].length, 64 * KiB))
                    for e in mine:
                        if e.zero:
                            await writer.write_zeroes(e.start, e.length)
                            continue
                        buf = bytearray(e.length)
                        await reader.readinto(e.start, memoryview(buf))
                        await writer.write(e.start, memoryview(buf))
                    await writer.flush()
                finally:
                    await writer.close()
                    await reader.close()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(copy(extents[0::2]))
                tg.create_task(copy(extents[1::2]))

            # Past the end: the daemon refuses, not retryable.
            writer = await dst.open_writer()
            try:
                with pytest.raises(ImageioError, match=r"offset 8388608: HTTP 416") as info:
                    await writer.write(SIZE, b"x")
                assert not info.value.retryable
            finally:
                await writer.close()
        await daemon.remove_ticket(WRITE_TICKET)
        await daemon.remove_ticket(READ_TICKET)
    await run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", source, target)


async def test_falls_back_to_the_proxy_url(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    dead = f"https://127.0.0.1:{closed_port()}/images/{READ_TICKET}"
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        proxy = daemon.data_url(READ_TICKET)
        async with await ImageioDisk.connect(dead, proxy, ca=engine_ca(daemon)) as disk:
            assert disk.url == proxy
            reader = await disk.open_reader()
            try:
                buf = bytearray(4 * KiB)
                await reader.readinto(SIZE - 4 * KiB, memoryview(buf))
            finally:
                await reader.close()
            assert buf == b"\x33" * len(buf)
        # The transfer URL answers: it is used, the proxy is not even tried.
        async with await ImageioDisk.connect(proxy, dead, ca=engine_ca(daemon)) as disk:
            assert disk.url == proxy
        # An HTTP answer is not routed around: 403 from the daemon raises.
        unknown = daemon.data_url("no-such-ticket-0000")
        with pytest.raises(ImageioTicketGone):
            await ImageioDisk.connect(unknown, proxy, ca=engine_ca(daemon))
        await daemon.remove_ticket(READ_TICKET)

    # Neither reachable: retryable, and both failures are named.
    with pytest.raises(ImageioTransientError, match="no URL of the transfer") as info:
        await ImageioDisk.connect(dead, dead.replace("/images/", "/images/x"), ca=engine_ca(daemon))
    assert isinstance(info.value, TransientError)
    assert info.value.retryable


async def test_connection_loss_is_transient(tmp_path: Path, daemon: ImageioDaemon) -> None:
    image = await make_source(tmp_path)
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        disk = await ImageioDisk.connect(daemon.data_url(READ_TICKET), ca=engine_ca(daemon))
        reader = await disk.open_reader()
        try:
            await daemon.stop()
            with pytest.raises(ImageioTransientError, match=r"GET 4096 bytes at offset 0") as info:
                await reader.readinto(0, memoryview(bytearray(4 * KiB)))
            assert info.value.retryable
        finally:
            await reader.close()
            await disk.close()


async def test_a_wrong_ca_fails_at_once_naming_url_and_ca(
    tmp_path: Path, daemon: ImageioDaemon
) -> None:
    """imageio's certificate checked against a CA that did not issue it: a clear, final error
    (no proxy fallback, no retry), naming the imageio URL and the CA file."""
    other = tmp_path / "other"
    other.mkdir()
    wrong = LabCa().issue(other).ca_file  # another engine's CA
    image = await make_source(tmp_path)
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        url = daemon.data_url(READ_TICKET)
        with pytest.raises(ImageioTlsError) as info:
            await ImageioDisk.connect(url, url, ca=EngineCa.from_file(wrong))
        message = str(info.value)
        assert f"https://127.0.0.1:{daemon.remote_port}/images/0b7e4d52…" in message
        assert str(wrong) in message
        assert "certificate verify failed" in message or "self-signed" in message
        assert "HTTP None" not in message and READ_TICKET not in message
        assert not info.value.retryable
        # The right CA reads; a reader with the wrong one fails the same way.
        async with await ImageioDisk.connect(url, ca=engine_ca(daemon)) as disk:
            reader = ImageioReader(url, ca=EngineCa.from_file(wrong))
            try:
                with pytest.raises(ImageioTlsError, match=str(wrong)):
                    await reader.readinto(0, memoryview(bytearray(4 * KiB)))
            finally:
                await reader.close()
            assert await disk.size() == SIZE
        await daemon.remove_ticket(READ_TICKET)


async def test_the_daemon_refuses_plain_http(tmp_path: Path, daemon: ImageioDaemon) -> None:
    """TLS is really on: an http client gets no HTTP answer at all from the data port."""
    image = await make_source(tmp_path)
    async with QemuNbd(image, "qcow2", read_only=True) as nbd:
        await daemon.add_ticket(READ_TICKET, f"nbd:unix:{nbd.address}", SIZE, ["read"])
        url = daemon.data_url(READ_TICKET)
        assert url.startswith("https://")
        plain = url.replace("https://", "http://", 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.remote_port)
        try:
            writer.write(f"OPTIONS {plain} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            answer = b""
            try:
                async with asyncio.timeout(10):
                    answer = await reader.read(1024)
            except ConnectionResetError:
                pass
            assert not answer.startswith(b"HTTP/"), answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        with pytest.raises(ImageioError):
            await ImageioDisk.connect(plain, ca=engine_ca(daemon))
        await daemon.remove_ticket(READ_TICKET)
