"""The disk layer of the lab DataMover's writable devices: a punched hole reads as zeroes.

A real DataMover sees an attached disk as a SCSI (or virtio-blk) block device. Punching a hole
in it (``fallocate(PUNCH_HOLE)``, what qemu-nbd does for an NBD zero request that may unmap)
becomes a zeroing command with unmap allowed (SCSI WRITE SAME with UNMAP, virtio-blk
WRITE_ZEROES), which the hypervisor's qemu answers with ``write_zeroes(MAY_UNMAP)``: the range
reads as zeroes afterwards, whether the image could drop its clusters or not.

The lab's device is a file of an ``nbdfuse`` mount, and nbdfuse turns a punched hole into an
NBD TRIM. A trim is only advice: qemu-nbd over a qcow2 image drops the part of a trim that does
not cover whole clusters, so old data would stay where zeroes were written. This process sits
between nbdfuse and the image's qemu-nbd and does what the real disk layer does::

    nbdfuse ──unix──▶ disklayer (TRIM → WRITE_ZEROES that may unmap) ──unix──▶ qemu-nbd

everything else passed on as it is (reads with their holes, block status, writes, FUA,
flush). It runs as its own process, as nbdfuse and qemu-nbd do, so that the embedded lab (in
the test's event loop) never serves its own devices' I/O.

``python -m plugins.lab.engine.disklayer --listen SOCKET --upstream SOCKET``; it listens once
the upstream export is open, and exits on SIGTERM or SIGINT.
"""

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from engine.io import qemu
from engine.io.nbd import protocol as p
from engine.io.nbd.client import NbdClient, connect
from engine.io.nbd.errors import NbdRequestError
from engine.io.nbd.serve import Listener, serve
from engine.io.nbd.server import Data, ExportSpec, Hole, Piece


class PassThrough:
    """An ``engine.io.nbd.serve.Backend`` over an NBD client: the upstream export as it is,
    its error replies with their errno (ENOSPC from a full block volume stays ENOSPC).

    The server answers a TRIM with ``write_zeroes`` (``serve``), and so does this layer."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client

    async def read(self, offset: int, length: int) -> list[Piece]:
        pieces: list[Piece] = []
        pos, end = offset, offset + length
        with _errno():
            while pos < end:
                for extent in await self.client.block_status(pos, end - pos):
                    if extent.zero:
                        pieces.append(Hole(extent.start, extent.length))
                    else:
                        data = await self.client.read(extent.start, extent.length)
                        pieces.append(Data(extent.start, data))
                    pos = extent.start + extent.length
        return pieces

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        with _errno():
            extents = await self.client.block_status(offset, length)
        return [
            (e.length, (p.STATE_ZERO if e.zero else 0) | (p.STATE_HOLE if e.hole else 0))
            for e in extents
        ]

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        with _errno():
            await self.client.write(offset, data)
            if fua:
                await self.client.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        with _errno():
            await self.client.write_zeroes(offset, length)  # may unmap: reads as zeroes after
            if fua:
                await self.client.flush()

    async def flush(self) -> None:
        with _errno():
            await self.client.flush()


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    """An upstream error reply as ``OSError`` with its errno, which the server passes on (an
    ``EngineError`` is answered EIO)."""
    try:
        yield
    except NbdRequestError as e:
        raise OSError(e.errno, str(e)) from e


class DiskLayer(qemu.NbdServerProcess):
    """This module as a server process over the NBD server at ``upstream`` (started, stopped
    and reaped like qemu-nbd)."""

    def __init__(self, upstream: Path) -> None:
        super().__init__()
        self.upstream = upstream

    def argv(self, socket: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            __name__,
            "--listen",
            str(socket),
            "--upstream",
            str(self.upstream),
        ]


async def run(listen: Path, upstream: Path) -> None:
    client = await connect(upstream)
    try:
        spec = ExportSpec(
            name="",
            size=client.export_size,
            read_only=client.read_only,
            preferred_block=max(512, client.block_size.preferred),
            multi_conn=client.can_multi_conn,
        )
        server = asyncio.create_task(serve(PassThrough(client), spec, [Listener(path=listen)]))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await server
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.lab.engine.disklayer")
    parser.add_argument("--listen", type=Path, required=True, help="unix socket to serve on")
    parser.add_argument("--upstream", type=Path, required=True, help="the image's qemu-nbd")
    args = parser.parse_args(argv)
    asyncio.run(run(args.listen, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
