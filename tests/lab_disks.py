"""The lab's disk images (``plugins.lab.disks.build_disks``) built once per test session for
each distinct set of requests, shared by the session's xdist workers, and copied for each
test: many tests' labs ask for the same disks, and a build generates files, runs mke2fs and
qemu-img (a guest layout boots a libguestfs appliance: ~40 s under TCG).

::

    session_disks(tmp_path_factory, requests) ──► each request's path: the caller's own copy
                                                   (the list build_disks would return)

    <session dir>/lab-disks/<key>/<i>        request i's image, never written once renamed here
    <session dir>/lab-disks/<key>.lock       flock: the first worker builds, the others wait
    <session dir>/lab-disks/<key>.building-* a build in progress (or a killed one's leftovers,
                                             removed by the next builder)
    key = sha256 of every request but its path (name, format, size, template, vm, layout),
          the build's environment, and the source of plugins/lab/disks.py and guest_disk.py

One set of requests is built by one ``build_disks`` call, as before: template OS disks of
several VMs are still clones of one template filesystem. The session dir is the one xdist's
workers share (the parent of each worker's basetemp; the basetemp itself without xdist), so
every session builds afresh (the builders stay tested) and pytest removes it with the
session's other files. A build goes to a temporary directory renamed into place when
complete, so a build killed half way leaves nothing anyone uses. Each caller gets copies
(``copy_extents``: the data and the holes as built, not the holes' zeros) so no test can
disturb another's disks.
"""

import asyncio
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from plugins.lab import disks, guest_disk
from plugins.lab.disks import DiskImage, DiskRequest, build_disks


def session_disks(
    factory: pytest.TempPathFactory,
    requests: Sequence[DiskRequest],
    env: Mapping[str, str] | None = None,
) -> list[DiskImage]:
    """Copy the session's build of ``requests`` (built on first use, with ``env`` added to
    the environment) to each request's path, new files; what ``build_disks`` returns. Blocks
    while another worker builds them; raises what the build raised. Call it from a thread
    (``asyncio.to_thread``) where an event loop runs."""
    built = _built(factory, requests, env or {})
    for i, request in enumerate(requests):
        copy_extents(built / str(i), request.path)
    return [DiskImage(r.path, r.format, r.size) for r in requests]


def copy_extents(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (a new file) extent by extent: the same bytes and the same
    holes, so a raw image's block status is what its build left (``cp --sparse`` would also
    turn written zeros into holes)."""
    with src.open("rb") as fin, dest.open("xb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # no data after offset
                    raise
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            while start < end:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), end - start, start, start)
                if done == 0:
                    raise OSError(errno.EIO, f"{src} ended at {start} while copying it")
                start += done
            offset = end
        fout.truncate(size)


def _session_dir(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _key(requests: Sequence[DiskRequest], env: Mapping[str, str]) -> str:
    what = [(r.name, r.format, r.size, r.template, r.vm, r.layout) for r in requests]
    digest = hashlib.sha256(repr((what, sorted(env.items()))).encode())
    for module in (disks, guest_disk):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]


def _built(
    factory: pytest.TempPathFactory, requests: Sequence[DiskRequest], env: Mapping[str, str]
) -> Path:
    cache = _session_dir(factory) / "lab-disks"
    cache.mkdir(exist_ok=True)
    key = _key(requests, env)
    built = cache / key
    with (cache / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when its process dies
        if not built.exists():
            for stale in cache.glob(f"{key}.building-*"):  # a killed builder's
                shutil.rmtree(stale, ignore_errors=True)
            building = Path(tempfile.mkdtemp(prefix=f"{key}.building-", dir=cache))
            into = [replace(r, path=building / str(i)) for i, r in enumerate(requests)]
            with pytest.MonkeyPatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)  # the builders' processes inherit it
                asyncio.run(build_disks(into, building / "work"))
            shutil.rmtree(building / "work")
            building.rename(built)
    return built


async def build_once(
    factory: pytest.TempPathFactory, requests: Sequence[DiskRequest]
) -> list[DiskImage]:
    """``build_disks(requests, work)`` for a test: ``session_disks`` from a coroutine (in a
    thread: it blocks)."""
    return await asyncio.to_thread(session_disks, factory, requests)
