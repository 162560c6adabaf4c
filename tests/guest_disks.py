"""The lab's guest disk (``plugins.lab.guest_disk``: MBR, ext4, XFS, NTFS, an ext4 LVM volume)
for the appliance's tests, built once per test session (``tests.lab_disks``): a build boots a
libguestfs appliance (~40 s under TCG), and every module of those tests needs the same disk.

::

    guest_disk_copy(tmp_path_factory, dest) ──► dest: the caller's own sparse copy of
                                                 the lab's disk NAME (SIZE bytes, raw)

The build is the lab's own (``build_disks`` with a ``partitioned`` request: what a lab VM's
disk of that seed is made of), so the lab's builder runs in every session.
"""

from pathlib import Path
from typing import Final

import pytest

from plugins.lab.disks import DiskRequest
from plugins.lab.guest_disk import MIN_SIZE
from tests.lab_disks import session_disks

NAME: Final = "files-vm"  # the seed of its files: guest_disk.guest_files(NAME)
SIZE: Final = MIN_SIZE
# This machine's nested KVM hangs booting a guest; the appliance runs emulated.
TCG: Final = {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def guest_disk_copy(factory: pytest.TempPathFactory, dest: Path) -> Path:
    """Copy the session's guest disk to ``dest``, a new file; returns ``dest``. Blocks while
    another worker builds it; raises what the build raised. Call it from a thread
    (``asyncio.to_thread``) where an event loop runs."""
    request = DiskRequest(NAME, dest, "raw", SIZE, layout="partitioned")
    (image,) = session_disks(factory, [request], env=TCG)
    return image.path
