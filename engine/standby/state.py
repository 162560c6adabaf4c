"""Standby state: what the standby copy of one VM holds, per store (``STORE/standby/``).

::

    STORE/standby/<vm_id>.json            StandbyState, rewritten atomically at every step
    STORE/standby/<vm_id>/<disk_id>.map   a copy of the DiskMap each standby disk holds

The DiskMap copy is the base of the next refresh: the slots whose id differs from it are the
ones written. It is a copy (not a reference to the applied snapshot) so that retention may
prune that snapshot without turning the next refresh into a full write.

Rules (``StandbyDisk``):

- ``applied``: the snapshot whose data the standby disk holds, with ``<disk_id>.map`` its ids.
- ``dirty``: a refresh started writing the disk and did not finish (failed, cancelled, killed).
  The disk then holds a mixture nobody recorded, so the next refresh writes it *without a
  base*: every slot, data slots with their data and zero slots with ``write_zeroes``. The
  flag is persisted before the first write and cleared only after the disk's transfer was
  finalized and its new map published.
- ``StandbyState.snapshot_id`` advances only when every disk of a refresh was written: a
  failed refresh leaves the standby at the previous snapshot (with some disks dirty).
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from engine.core.errors import EngineError, StoreError
from engine.store.diskmap import DiskMap
from engine.util.fs import TMP_SUFFIX, atomic_write, fsync_dir

KEEP_HISTORY: Final = 50  # refreshes remembered per VM (a few KiB; enough to see a pattern)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StandbyDisk:
    standby_disk_id: str  # the disk on the standby engine
    size: int  # bytes the standby disk was created with
    name: str = ""
    applied: str | None = None  # snapshot whose data the disk holds (None: unknown)
    dirty: bool = False


@dataclass
class StandbyState:
    vm_id: str  # the source VM (the snapshots' VM id)
    vm_name: str
    standby_vm_id: str
    standby_vm_name: str
    snapshot_id: str | None = None  # last snapshot every disk was brought to
    disks: dict[str, StandbyDisk] = field(default_factory=dict)  # source disk id → standby
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)
    history: list[dict[str, Any]] = field(default_factory=list)  # mode, snapshot, reason…

    def note(self, **event: Any) -> None:
        self.history.append({"time": now(), **event})
        del self.history[:-KEEP_HISTORY]


class StandbyStateError(StoreError):
    template = "standby state {path}: {reason}"


def state_dir(store_path: Path) -> Path:
    return store_path / "standby"


def _check_id(value: str) -> str:
    if not value or "/" in value or value.startswith(".") or "\0" in value:
        raise ValueError(f"not a usable id for a file name: {value!r}")
    return value


def state_path(store_path: Path, vm_id: str) -> Path:
    return state_dir(store_path) / f"{_check_id(vm_id)}.json"


def map_path(store_path: Path, vm_id: str, disk_id: str) -> Path:
    return state_dir(store_path) / _check_id(vm_id) / f"{_check_id(disk_id)}.map"


def load(store_path: Path, vm_id: str) -> StandbyState | None:
    """The VM's standby state, or None when it has none (never refreshed, or discarded)."""
    path = state_path(store_path, vm_id)
    try:
        doc = json.loads(path.read_bytes())
        disks = {k: StandbyDisk(**v) for k, v in doc.pop("disks").items()}
        return StandbyState(**doc, disks=disks)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise StandbyStateError(path=path, reason=f"unreadable ({e})") from e


def save(store_path: Path, state: StandbyState) -> None:
    state.updated = now()
    path = state_path(store_path, state.vm_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(state), indent=1).encode(), "standby")


def discard(store_path: Path, vm_id: str) -> None:
    """Forget the VM's standby (its copy no longer exists): state file and maps."""
    state_path(store_path, vm_id).unlink(missing_ok=True)
    shutil.rmtree(state_dir(store_path) / _check_id(vm_id), ignore_errors=True)
    fsync_dir(state_dir(store_path))


def publish_map(store_path: Path, vm_id: str, disk_id: str, source: Path) -> None:
    """Copy ``source`` (a snapshot's DiskMap) as the disk's base, durably and atomically."""
    path = map_path(store_path, vm_id, disk_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    shutil.copyfile(source, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def open_base(store_path: Path, state: StandbyState, disk_id: str) -> DiskMap | None:
    """The base of the disk's next refresh, or None (write every slot): no state for the
    disk, a dirty disk, or a map that is missing or damaged (a full write repairs it)."""
    disk = state.disks.get(disk_id)
    if disk is None or disk.dirty or disk.applied is None:
        return None
    try:
        return DiskMap(map_path(store_path, state.vm_id, disk_id))
    except (OSError, EngineError):  # CorruptDiskMap of a copy: the full write repairs it
        return None
