"""``Overlay``: a copy-on-write layer that makes a read-only export writable.

The store never changes: writes go to a local sparse file ``FILE`` (the disk's size, each
block at its own offset) and a block map ``FILE.tessera-map`` beside it records, per
``BLOCK`` bytes of disk, where that block's bytes are now::

    FILE.tessera-map:  header (MAP_HEADER bytes: JSON naming snapshot, disk, size, block
                       size; space-padded) ‖ one byte per block:
                       0 BASE  read from the snapshot (the store)
                       1 DATA  read from FILE at the same offset
                       2 ZERO  reads as zeroes (WRITE_ZEROES, TRIM)

Reads split the request into runs of one state. A write that covers part of a BASE or
ZERO block copies the block's current bytes first (copy-on-write), so DATA blocks are
always whole. Order: data ``pwrite`` → map ``pwrite``; FLUSH (and FUA) fsyncs the data file,
then the map. A crash may lose writes not yet flushed, as a disk's cache would. The same
overlay can be served again (it must name the same snapshot, disk and size, else
``ConfigError``); deleting both files discards it.

Writes are serialised (one lock): copy-on-write of a block must not race another write of
it. Reads run concurrently with everything.
"""

import asyncio
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from engine.core.errors import ConfigError
from engine.core.units import KiB
from engine.io.nbd.serve import Backend
from engine.io.nbd.server import Data, Hole, Piece
from engine.restore.export import HOLE_ZERO, STATUS_SLOTS

T = TypeVar("T")

BLOCK: Final = 64 * KiB  # the smallest store chunk: a block never spans two slots
MAP_HEADER: Final = 4096
MAP_SUFFIX: Final = ".tessera-map"
BASE, DATA, ZERO = 0, 1, 2
FORMAT: Final = 1


class Overlay:
    """A writable view of ``base`` through the overlay at ``path``; use ``open``."""

    def __init__(
        self, base: Backend, path: Path, size: int, data_fd: int, map_fd: int, states: bytearray
    ) -> None:
        self.base = base
        self.path = path
        self.size = size
        self._data_fd = data_fd
        self._map_fd = map_fd
        self._states = states
        self._lock = asyncio.Lock()
        self.blocks_written = 0

    @classmethod
    def open(cls, base: Backend, path: Path, *, snapshot: str, disk: str, size: int) -> "Overlay":
        """Open the overlay at ``path`` (created when neither file exists). ConfigError when
        it belongs to another snapshot, disk or size, or only one of its files exists.
        The caller closes it (``close``)."""
        map_path = path.with_name(path.name + MAP_SUFFIX)
        identity = {
            "format": FORMAT,
            "snapshot": snapshot,
            "disk": disk,
            "size": size,
            "block_size": BLOCK,
        }
        blocks = -(-size // BLOCK)
        if path.exists() != map_path.exists():
            missing = map_path if path.exists() else path
            raise ConfigError(
                message=f"overlay {path}: {missing} is missing; remove both "
                "files to start a new overlay"
            )
        new = not path.exists()
        data_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            map_fd = os.open(map_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(data_fd)
            raise
        try:
            if new:
                os.ftruncate(data_fd, size)
                header = json.dumps(identity).encode().ljust(MAP_HEADER - 1) + b"\n"
                os.pwrite(map_fd, header, 0)
                os.ftruncate(map_fd, MAP_HEADER + blocks)
                os.fsync(map_fd)
                states = bytearray(blocks)
            else:
                raw = os.pread(map_fd, MAP_HEADER + blocks, 0)
                try:
                    found = json.loads(raw[:MAP_HEADER])
                except ValueError:
                    found = None
                if found != identity or len(raw) != MAP_HEADER + blocks:
                    raise ConfigError(
                        message=f"overlay {path} belongs to {_describe(found)}, not to disk "
                        f"{disk} of snapshot {snapshot} ({size} bytes)"
                    )
                states = bytearray(raw[MAP_HEADER:])
        except BaseException:
            os.close(data_fd)
            os.close(map_fd)
            raise
        return cls(base, path, size, data_fd, map_fd, states)

    def close(self) -> None:
        for fd in (self._data_fd, self._map_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._map_fd = -1

    # --- the Backend protocol ----------------------------------------------------------------

    async def read(self, offset: int, length: int) -> list[Piece]:
        pieces: list[Piece] = []
        for state, start, stop in self._runs(offset, offset + length):
            if state == BASE:
                pieces += await self.base.read(start, stop - start)
            elif state == DATA:
                data = await _blocking(_pread, self._data_fd, stop - start, start)
                pieces.append(Data(start, data))
            else:
                pieces.append(Hole(start, stop - start))
        return pieces

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        end = min(offset + length, offset + STATUS_SLOTS * BLOCK)
        out: list[tuple[int, int]] = []
        for state, start, stop in self._runs(offset, end):
            if state == BASE:
                pos = start
                while pos < stop:
                    for size, flags in await self.base.block_status(pos, stop - pos):
                        n = min(size, stop - pos)
                        out.append((n, flags))
                        pos += n
                        if pos >= stop:
                            break
            else:
                out.append((stop - start, 0 if state == DATA else HOLE_ZERO))
        merged: list[tuple[int, int]] = []
        for n, flags in out:
            if merged and merged[-1][1] == flags:
                merged[-1] = (merged[-1][0] + n, flags)
            else:
                merged.append((n, flags))
        return merged

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        async with self._lock:
            await self._write_locked(offset, data)
            if fua:
                await self._sync()

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        async with self._lock:
            end = offset + length
            inner_start = -(-offset // BLOCK) * BLOCK
            inner_end = max(inner_start, end // BLOCK * BLOCK)
            if inner_start >= inner_end:  # inside one block: copy-on-write zeroes
                await self._write_locked(offset, bytes(length))
            else:
                if offset < inner_start:
                    await self._write_locked(offset, bytes(inner_start - offset))
                if inner_end < end:
                    await self._write_locked(inner_end, bytes(end - inner_end))
                first, last = inner_start // BLOCK, inner_end // BLOCK
                await self._set_states(first, last, ZERO)
            if fua:
                await self._sync()

    async def flush(self) -> None:
        async with self._lock:
            await self._sync()

    # --- internals ---------------------------------------------------------------------------

    def _runs(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        """(state, start, stop) runs covering ``[offset, end)``."""
        runs: list[tuple[int, int, int]] = []
        pos = offset
        while pos < end:
            block = pos // BLOCK
            state = self._states[block]
            stop = min(end, (block + 1) * BLOCK)
            if runs and runs[-1][0] == state:
                runs[-1] = (state, runs[-1][1], stop)
            else:
                runs.append((state, pos, stop))
            pos = stop
        return runs

    async def _write_locked(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        start_block, end_block = offset // BLOCK, -(-end // BLOCK)
        a_start, a_end = start_block * BLOCK, min(self.size, end_block * BLOCK)
        if a_start == offset and a_end == end:
            buf: bytes | bytearray = data
        else:  # copy-on-write: the partial head and tail blocks' current bytes first
            buf = bytearray(a_end - a_start)
            head = (a_start, min(a_end, a_start + BLOCK))
            tail = ((end_block - 1) * BLOCK, a_end)
            for lo, hi in (head, tail) if head != tail else (head,):
                if (lo < offset or hi > end) and self._states[lo // BLOCK] != ZERO:
                    buf[lo - a_start : hi - a_start] = await self._read_bytes(lo, hi - lo)
            buf[offset - a_start : end - a_start] = data
        await _blocking(_pwrite_all, self._data_fd, buf, a_start)
        await self._set_states(start_block, end_block, DATA)
        self.blocks_written += end_block - start_block

    async def _read_bytes(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for piece in await self.read(offset, length):
            if isinstance(piece, Data):
                at = piece.offset - offset
                out[at : at + len(piece.data)] = piece.data
        return bytes(out)

    async def _set_states(self, first: int, last: int, state: int) -> None:
        self._states[first:last] = bytes([state]) * (last - first)
        await _blocking(
            _pwrite_all, self._map_fd, bytes(self._states[first:last]), MAP_HEADER + first
        )

    async def _sync(self) -> None:
        await _blocking(os.fsync, self._data_fd)
        await _blocking(os.fsync, self._map_fd)


def _describe(found: object) -> str:
    if isinstance(found, dict):
        disk, snapshot, size = found.get("disk"), found.get("snapshot"), found.get("size")
        return f"disk {disk} of snapshot {snapshot} ({size} bytes)"
    return "something else (its map has no readable header)"


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    return data + bytes(length - len(data))


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


async def _blocking(fn: Callable[..., T], *args: object) -> T:
    """A blocking call in the default executor; a cancelled caller waits for it to end."""
    future = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
