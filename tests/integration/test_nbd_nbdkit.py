"""The NBD client against nbdkit: injected errors (error filter) and slow, parallel replies
(delay filter). nbdkit runs through the same process wrapper as qemu-nbd."""

import asyncio
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.core.errors import TransientError
from engine.core.units import KiB, MiB
from engine.io.nbd import connect, extents
from engine.io.nbd.errors import (
    EIO,
    ENOSPC,
    ESHUTDOWN,
    NbdConnectionError,
    NbdRequestError,
    NbdTransientRequestError,
)
from engine.io.qemu import NbdServerProcess
from tests.unit.io import leaks

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every server started by a test is reaped by the end (zombies count)."""
    processes = leaks.children()
    yield
    assert leaks.children() <= processes


class NbdKit(NbdServerProcess):
    """nbdkit in the foreground on the private socket; dies with the test process too."""

    def __init__(self, *args: str) -> None:
        super().__init__()
        self.args = args

    def argv(self, socket: Path) -> list[str]:
        return ["nbdkit", "--foreground", "--exit-with-parent", f"--unix={socket}", *self.args]


async def test_injected_eio_is_retryable_and_a_retry_succeeds(tmp_path: Path) -> None:
    inject = tmp_path / "inject-read"
    full = tmp_path / "inject-write"
    server = NbdKit(
        "--filter=error",
        "memory",
        "1M",
        "error-pread=EIO",
        "error-pread-rate=100%",
        f"error-pread-file={inject}",
        "error-pwrite=ENOSPC",
        "error-pwrite-rate=100%",
        f"error-pwrite-file={full}",
    )
    async with server, await connect(server.address) as client:
        await client.write(64 * KiB, b"\x42" * 4096)  # no error file yet: works

        inject.touch()
        with pytest.raises(NbdRequestError) as info:
            await client.read(64 * KiB, 4096)
        error = info.value
        assert isinstance(error, NbdTransientRequestError)
        assert isinstance(error, TransientError)
        assert error.retryable
        assert error.errno == EIO
        assert "READ offset=65536 length=4096" in str(error)

        inject.unlink()  # the fault goes away: the caller's retry succeeds on the same client
        assert await client.read(64 * KiB, 4096) == b"\x42" * 4096

        full.touch()
        with pytest.raises(NbdRequestError) as info:
            await client.write(0, b"x" * 512)
        assert info.value.errno == ENOSPC
        assert not info.value.retryable
        assert not isinstance(info.value, TransientError)


async def test_injected_eshutdown_disconnects_softly(tmp_path: Path) -> None:
    server = NbdKit("--filter=error", "memory", "1M", "error-pread=ESHUTDOWN", "error-pread-rate=1")
    async with server, await connect(server.address) as client:
        with pytest.raises(NbdTransientRequestError) as info:
            await client.read(0, 512)
        assert info.value.errno == ESHUTDOWN
        # The client disconnected on its own (the spec requires it); it takes no more requests.
        with pytest.raises(NbdConnectionError, match="shutting down"):
            await client.read(0, 512)


async def test_delayed_parallel_replies(tmp_path: Path) -> None:
    size = 8 * MiB
    server = NbdKit(
        "--filter=delay",
        "memory",
        str(size),
        "delay-read=2ms",
        "delay-write=2ms",
        "delay-zero=2ms",
        "delay-extents=2ms",
    )
    model = bytearray(size)
    async with server, await connect(server.address) as client:
        assert client.export_size == size
        pieces = [(i * 256 * KiB + 512, os.urandom(100 * KiB)) for i in range(24)]
        async with asyncio.TaskGroup() as tg:
            for offset, data in pieces:
                tg.create_task(client.write(offset, data))
                model[offset : offset + len(data)] = data
        await client.write_zeroes(512, 1000)
        model[512:1512] = bytes(1000)
        await client.flush()

        results = await asyncio.gather(*(client.read(o, len(d) + 512) for o, d in pieces))
        for (offset, data), got in zip(pieces, results, strict=True):
            assert got == model[offset : offset + len(data) + 512]
        assert await client.read(0, size) == model

        found = [e async for e in extents(client, 0, size)]
    assert found[0].start == 0
    assert all(a.end == b.start for a, b in itertools.pairwise(found))
    assert found[-1].end == size
    # nbdkit's memory plugin keeps whole pages (32 KiB in 1.32): written ones are data, the
    # untouched tail is one hole that reads as zeroes.
    for offset, data in pieces:
        assert not any(e.hole and e.start < offset + len(data) and offset < e.end for e in found)
    assert found[-1].hole
    assert found[-1].zero
    assert found[-1].start <= 6 * MiB
