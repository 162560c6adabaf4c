"""NBD servers (``qemu.NbdServerProcess``) as a job journals them, and how recovery stops what a
killed job left: by each server's private directory, found in ``/proc/*/cmdline``
(``qemu.stop_leftovers``), whether or not its pid was known. Used by every plugin that
serves disks through qemu-nbd (local images, the DataMover's devices)."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.io import qemu


def export_records(exports: Sequence[qemu.NbdServerProcess]) -> list[dict[str, Any]]:
    """The journal entries of prepared exports: private directory, and pid once running."""
    return [{"dir": str(e.workdir), "pid": e.pid} for e in exports if e.workdir is not None]


async def stop_exports(entries: Sequence[dict[str, Any]]) -> list[str]:
    """Stop the NBD servers journaled as ``export_records`` and remove their directories.

    Found by directory, so an export journaled before its process started (no pid) is
    found as well as one that ran; an entry of an older journal names its ``socket`` in
    that directory. Idempotent: what is gone already is skipped silently.
    """
    done = []
    for entry in entries:
        workdir = Path(entry["dir"]) if "dir" in entry else Path(entry["socket"]).parent
        existed = workdir.exists()
        try:
            pids = await qemu.stop_leftovers(workdir)
        except ValueError as e:  # not a server directory: never delete it
            done.append(f"left {workdir} alone: {e}")
            continue
        done += [f"stopped qemu-nbd {pid} left by the killed job in {workdir}" for pid in pids]
        if existed:
            done.append(f"removed export directory {workdir}")
    return done
