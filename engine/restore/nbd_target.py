"""A restore target over an NBD export: what a local image and a device attached to the
DataMover have in common once qemu-nbd serves them (``plugins.local``, ``plugins.ovirt``)."""

from typing import Final

from engine.core.errors import ConfigError
from engine.io import qemu
from engine.io.nbd import NbdClient, connect
from engine.sources.types import DiskInfo

DEFAULT_MAX_CONNECTIONS: Final = 8


class NbdWriter:
    """A ``DiskWriter``: one NBD connection to the export; close it when done."""

    def __init__(self, client: NbdClient, disk: "NbdTargetDisk") -> None:
        self._client = client
        self._disk = disk

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._client.write(offset, data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        await self._client.write_zeroes(offset, length)

    async def flush(self) -> None:
        await self._client.flush()

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        self._disk._writers.discard(self)
        await self._client.close()


class NbdTargetDisk:
    """A ``TargetDisk`` written through a running NBD export (qemu-nbd over a local image or a
    device): each writer one connection, at most ``max_connections`` at once."""

    def __init__(
        self, info: DiskInfo, fresh: bool, export: qemu.QemuNbd, max_connections: int
    ) -> None:
        self.info = info
        self.fresh = fresh
        self._export = export
        self._max = max_connections
        self._writers: set[NbdWriter] = set()

    async def open_writer(self) -> NbdWriter:
        """A new connection; ConfigError beyond ``max_connections`` open at once."""
        if len(self._writers) >= self._max:
            raise ConfigError(
                message=f"image {self._export.image}: {len(self._writers)} writers are open; "
                f"its export serves at most {self._max}"
            )
        writer = NbdWriter(await connect(self._export.address, meta_contexts=()), self)
        self._writers.add(writer)
        return writer

    async def close_writers(self) -> None:
        """Close every writer still open (each close is bounded by the NBD client)."""
        while self._writers:
            await self._writers.pop().close()
