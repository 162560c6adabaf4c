"""Direct reads of a raw image: a regular file or a block device, read in place with
``preadv``, no server in between.

A raw image holds a disk's bytes as they are, so reading it needs no format driver: a
qemu-nbd in front of it only adds a second process, a socket and a copy of every byte
through the kernel. qemu-nbd stays where a format needs it (qcow2: clusters, backing
chains, dirty bitmaps). Used by ``plugins.local`` for raw images and by ``plugins.ovirt``
for the device of a snapshot disk attached to the DataMover (LAN-free)::

    DirectImage.open(path, disk=D)       one descriptor: kind, size, extents
      ├── open_reader() ─▶ DirectReader  its own descriptor and its own thread;
      │                                  readinto(offset, view): preadv into view in place
      └── close()                        (readers are closed by whoever opened them)

Opening is ``O_RDONLY | O_CLOEXEC``; the size is a file's ``st_size`` or a block device's
``lseek(SEEK_END)``; anything else (a directory, a character device) is refused.

**Extents.** A regular file's holes (``SEEK_DATA``/``SEEK_HOLE``) are ``zero`` and ``hole``
extents, the rest data. A file system that cannot tell (``EINVAL``, ``EOPNOTSUPP``) and a
block device report everything as data: the pipeline recognises all-zero slots by their
hash after reading them. A file found shorter than when it was opened is an error, never
reported as a hole: what was cut off is lost data, not zeros.

**Threads.** Every blocking call runs off the event loop: each reader has one thread of its
own (``preadv`` releases the GIL, so N readers read in parallel), the rest (open, extents,
close) runs in the loop's default executor. A ``readinto`` that is cancelled returns only
once its thread has let go of the caller's buffer, because the thread writes into it until
``preadv`` returns: a read stuck in the kernel keeps the cancellation waiting, as a stuck
device keeps any reader of it. A reader's ``close`` runs on the reader's thread, after any
read still queued there, so a descriptor is never closed under a read.

**Page cache.** Reads go through the page cache. No ``O_DIRECT``: it needs page-aligned
memory and the thread pool's buffer arena is a bytearray (16 bytes past a page boundary);
a bounce buffer would cost a copy of every byte, the copy this module exists to avoid.
``drop_cache=True`` drops each range from the cache once read (``POSIX_FADV_DONTNEED``) for
an image no one else reads (the DataMover's transient snapshot device: its pages are of no
use to anyone after the backup read them once); a local image may be cached for others, so
its cache is left alone.

**Errors** (``EngineError``, naming the disk, the path and the offset)::

    DirectImageError            cannot open or use the image (missing, not a file or
    │                           block device, closed)
    └── DirectReadError         a read failed: a short read at the end of the file (it was
        │                       truncated), a range past the disk's end, an errno
        └── DirectTransientReadError  (also TransientError) EIO, ENOMEM, ETIMEDOUT: may
                                      succeed when retried on a new reader, as the NBD
                                      path's EIO (storage path failover, an NFS hiccup)
"""

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Self, TypeVar

from engine.core.errors import EngineError, TransientError
from engine.core.extent import Extent
from engine.util.inbox import Inbox

# errnos of a read that may succeed when retried (see the module docstring): the others
# (EBADF, EINVAL, ENXIO, ENODEV: the device is gone, ENOTCONN: its FUSE daemon died) repeat.
TRANSIENT_ERRNOS: Final = frozenset({errno.EIO, errno.ENOMEM, errno.ETIMEDOUT})
# SEEK_DATA/SEEK_HOLE failing with these: the file system cannot tell holes from data.
NO_HOLE_INFO: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP})


class DirectImageError(EngineError):
    """The image cannot be opened or used."""

    template = "disk {disk}: {path}: {reason}"


class DirectReadError(DirectImageError):
    """A read (or an extents query) failed; repeating it will not help."""

    template = "disk {disk}: reading {path} at offset {offset}: {reason}"


class DirectTransientReadError(DirectReadError, TransientError):
    """A read failed with an errno a retry on a new reader may get past."""


def errno_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, f"errno {e.errno}") if e.errno else type(e).__name__
    return f"{name} ({e.strerror or e})"


class DirectImage:
    """A raw file or block device opened for direct reads; build with ``open``.

    ``size`` is the image's size when opened; ``kind`` is ``"file"`` or ``"block device"``.
    ``close`` (idempotent) closes the image's own descriptor; readers it handed out are
    their openers' to close.
    """

    def __init__(
        self, path: str, disk: str, fd: int, kind: str, size: int, drop_cache: bool
    ) -> None:
        self.path = path
        self.disk = disk
        self.kind = kind
        self.size = size
        self.drop_cache = drop_cache
        self._fd: int | None = fd

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], *, disk: str, drop_cache: bool = False
    ) -> Self:
        """Open ``path`` read-only. ``disk`` names the disk in errors. Raises
        ``DirectImageError`` when it cannot be opened or is neither a regular file nor a
        block device."""
        name = os.fspath(path)
        try:
            fd, kind, size = await _in_thread(open_raw, name, lambda opened: opened[0])
        except OSError as e:
            raise DirectImageError(disk=disk, path=name, reason=errno_text(e)) from e
        if fd is None:
            raise DirectImageError(disk=disk, path=name, reason=kind)
        return cls(name, disk, fd, kind, size, drop_cache)

    def _check_open(self) -> int:
        if self._fd is None:
            raise DirectImageError(disk=self.disk, path=self.path, reason="closed")
        return self._fd

    def read_error(self, offset: int, e: OSError) -> DirectReadError:
        """The error for ``e``, raised by a read or seek at ``offset``."""
        cls = DirectTransientReadError if e.errno in TRANSIENT_ERRNOS else DirectReadError
        return cls(disk=self.disk, path=self.path, offset=offset, reason=errno_text(e))

    def check_range(self, offset: int, length: int) -> None:
        """Raise ``DirectReadError`` unless ``[offset, offset + length)`` is inside the image."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DirectReadError(
                disk=self.disk,
                path=self.path,
                offset=offset,
                reason=f"{length} bytes from there pass the end of the {self.kind} "
                f"({self.size} bytes)",
            )

    async def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation extents covering ``[offset, offset + length)`` exactly: holes ``zero``
        and ``hole``, the rest data (see the module docstring). Raises ``DirectReadError``
        for a range past the end or a file found shorter than it was."""
        fd = self._check_open()
        self.check_range(offset, length)
        if length == 0:
            return []
        if self.kind != "file":
            return [Extent(offset, length)]
        return await asyncio.to_thread(self._file_extents, fd, offset, offset + length)

    def _file_extents(self, fd: int, start: int, end: int) -> list[Extent]:
        try:
            now = os.fstat(fd).st_size
        except OSError as e:
            raise self.read_error(start, e) from e
        if now < self.size:
            raise DirectReadError(
                disk=self.disk,
                path=self.path,
                offset=now,
                reason=f"the file was truncated to {now} bytes since it was opened "
                f"({self.size} bytes): the rest is gone, not zeros",
            )
        out: list[Extent] = []
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data from pos to the end of the file
                    data = end
                elif e.errno in NO_HOLE_INFO:
                    return [Extent(start, end - start)]
                else:
                    raise self.read_error(pos, e) from e
            if data > pos:
                out.append(Extent(pos, min(data, end) - pos, zero=True, hole=True))
            if data >= end:
                break
            try:
                hole = os.lseek(fd, data, os.SEEK_HOLE)  # the end of the file at the latest
            except OSError as e:
                raise self.read_error(data, e) from e
            out.append(Extent(data, min(hole, end) - data))
            pos = hole
        return out

    async def open_reader(self) -> "DirectReader":
        """A new reader on a descriptor of its own (one reader per concurrent caller, as an
        NBD connection). Raises ``DirectImageError`` when the path cannot be opened again
        (the device went away)."""
        self._check_open()
        try:
            fd = await _in_thread(_open_reader, self.path, lambda fd: fd)
        except OSError as e:
            raise DirectImageError(disk=self.disk, path=self.path, reason=errno_text(e)) from e
        return DirectReader(self, fd)

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await asyncio.to_thread(os.close, fd)


T = TypeVar("T")


async def _in_thread(opener: Callable[[str], T], path: str, fd_of: Callable[[T], int | None]) -> T:
    """``opener(path)`` in the default executor. Cancelled meanwhile, the opening goes on in
    its thread: the descriptor it returns (``fd_of`` its result) is closed then, not leaked."""
    work = asyncio.ensure_future(asyncio.to_thread(opener, path))

    def close_late(done: "asyncio.Future[T]") -> None:
        if not done.cancelled() and done.exception() is None:
            fd = fd_of(done.result())
            if fd is not None:
                os.close(fd)

    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        work.add_done_callback(close_late)
        raise


def open_raw(path: str, flags: int = os.O_RDONLY) -> tuple[int | None, str, int]:
    """(fd, kind, size) of ``path`` opened with ``flags`` (and O_CLOEXEC), or (None, why
    not, 0) for what is not a raw image (a regular file or a block device)."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return fd, "file", os.fstat(fd).st_size
        if stat.S_ISBLK(mode):
            return fd, "block device", os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None, "not a regular file or block device", 0


def _open_reader(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # a hint: larger readahead for what reads in order
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd


class DirectReader:
    """One reader of a ``DirectImage`` (a ``engine.sources.types.DiskReader``): not shared
    between concurrent callers; ``close`` (idempotent) after the last read."""

    def __init__(self, image: DirectImage, fd: int) -> None:
        self._image = image
        self._fd: int | None = fd
        # One thread: reads of one reader are sequential anyway, and close() queued behind
        # them can never close the descriptor under a read.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tessera-read")
        self._inbox = Inbox()  # reads complete on the loop without a GIL-held wakeup

    async def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``, looping on short reads. Raises
        ``DirectReadError`` (``DirectTransientReadError`` for a retryable errno) naming the
        disk and the offset where the read failed."""
        if self._fd is None:
            raise DirectImageError(disk=self._image.disk, path=self._image.path, reason="closed")
        self._image.check_range(offset, len(buf))
        if not len(buf):
            return
        work = self._inbox.wrap(self._thread.submit(self._read, self._fd, offset, buf))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread writes into ``buf`` until preadv returns: the caller may reuse the
            # buffer only after that.
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # retrieved: the caller is cancelled anyway
            raise

    def _read(self, fd: int, offset: int, buf: memoryview) -> None:
        image, done, length = self._image, 0, len(buf)
        while done < length:
            with buf[done:] as rest:
                try:
                    got = os.preadv(fd, [rest], offset + done)
                except OSError as e:
                    raise image.read_error(offset + done, e) from e
            if got == 0:
                raise DirectReadError(
                    disk=image.disk,
                    path=image.path,
                    offset=offset + done,
                    reason=f"the {image.kind} ends there, {length - done} bytes short of the "
                    f"read; it had {image.size} bytes when opened (truncated since?)",
                )
            done += got
        if image.drop_cache:
            with contextlib.suppress(OSError):  # a hint
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            await self._inbox.wrap(self._thread.submit(os.close, fd))
        finally:
            self._thread.shutdown(wait=False)
            self._inbox.close()
