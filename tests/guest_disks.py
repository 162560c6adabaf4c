"""The lab's guest disk (``plugins.lab.guest_disk``: MBR, ext4, XFS, NTFS, an ext4 LVM volume)
built once per test session and shared by its xdist workers: a build boots a libguestfs
appliance (~40 s under TCG), and every module of the appliance's tests needs the same disk.

::

    guest_disk_copy(tmp_path_factory, dest) ──► dest: the caller's own sparse copy of
                                                 the lab's disk NAME (SIZE bytes, raw)

    <session dir>/guest-disks/<key>.raw          built once, never written after its rename
    <session dir>/guest-disks/<key>.lock         flock: the first worker builds, others wait
    <session dir>/guest-disks/<key>.building-*   a build in progress (or a killed one's
                                                 leftovers, removed by the next builder)
    key = sha256 of NAME, SIZE and the source of plugins/lab/guest_disk.py and disks.py

The build is the lab's own (``build_disks`` with a ``partitioned`` request: what a lab VM's
disk of that seed is made of), so the lab's builder runs in every session. The session dir is
the one xdist's workers share (the parent of each worker's basetemp; the basetemp itself
without xdist): each session builds afresh and pytest removes the image with the session's
other files. A build goes to a temporary name and is renamed when complete, so a build killed
half way leaves nothing anyone uses. Each caller gets a copy (``cp --sparse=always``: the
data, not 600 MiB of zeros) so no test can disturb another's disk.
"""

import asyncio
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

import pytest

from plugins.lab import disks, guest_disk
from plugins.lab.disks import DiskRequest, build_disks

NAME: Final = "files-vm"  # the seed of its files: guest_disk.guest_files(NAME)
SIZE: Final = guest_disk.MIN_SIZE
# This machine's nested KVM hangs booting a guest; the appliance runs emulated.
TCG: Final = {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def guest_disk_copy(factory: pytest.TempPathFactory, dest: Path) -> Path:
    """Copy the session's guest disk (built on first use, see above) to ``dest``, a new file;
    returns ``dest``. Blocks while another worker builds it; raises what the build raised.
    Call it from a thread (``asyncio.to_thread``) where an event loop runs."""
    subprocess.run(
        ["cp", "--sparse=always", str(_built(factory)), str(dest)],
        check=True,
        capture_output=True,
    )
    return dest


def _session_dir(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _built(factory: pytest.TempPathFactory) -> Path:
    cache = _session_dir(factory) / "guest-disks"
    cache.mkdir(exist_ok=True)
    key = hashlib.sha256(
        f"{NAME}\0{SIZE}\0".encode()
        + Path(guest_disk.__file__).read_bytes()
        + Path(disks.__file__).read_bytes()
    ).hexdigest()[:16]
    image = cache / f"{key}.raw"
    with (cache / f"{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when its process dies
        if not image.exists():
            for stale in cache.glob(f"{key}.building-*"):  # a killed builder's
                shutil.rmtree(stale, ignore_errors=True)
            building = Path(tempfile.mkdtemp(prefix=f"{key}.building-", dir=cache))
            with pytest.MonkeyPatch.context() as env:
                for name, value in TCG.items():
                    env.setenv(name, value)  # build_guest_disk's process inherits it
                request = DiskRequest(
                    NAME, building / "disk.raw", "raw", SIZE, layout="partitioned"
                )
                asyncio.run(build_disks([request], building / "work"))
            (building / "disk.raw").rename(image)
            shutil.rmtree(building)
    return image
