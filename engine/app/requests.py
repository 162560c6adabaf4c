"""What a backup or a restore is asked to do, as typed values, and the choices a request
offers by name (levels, flows, readers per disk).

Plain values with no machinery behind them: ``backup`` and ``restore`` take these requests,
and the command line builds its parser from the same choices before it runs anything
(issue 15: ``tessera backup image --help`` loads no store, pipeline or plugin).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.core.errors import ConfigError
from engine.pipeline.defaults import DEFAULT_DISKS_AT_ONCE, DEFAULT_READERS
from engine.sched.level import LEVELS

BACKUP_FLOWS: Final = ("auto", "backup-api", "snapshot-imageio", "snapshot-attach")
RESTORE_FLOWS: Final = ("imageio", "attach")


@dataclass(frozen=True, slots=True)
class VmBackupRequest:
    """Back up these VMs (names; globs allowed) of one engine of the configuration;
    ``disks`` (names/globs of disk aliases, or disk ids; empty: every disk) limits the disks
    of each VM that are read (``engine.sources.selection``)."""

    vms: tuple[str, ...]
    level: str = "incremental"
    flow: str = "auto"
    require_quiesce: bool = False
    engine: str | None = None  # the configuration's engine name (None: the only one)
    readers: int = DEFAULT_READERS
    policy: str | None = None  # the policy whose run this is; None: made by hand
    disks: tuple[str, ...] = ()  # a policy's ``selection.disks``, ``backup vm --disk``

    def check(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(message=f"level {self.level!r} is unknown; use one of {LEVELS}")
        if self.flow not in BACKUP_FLOWS:
            raise ConfigError(message=f"flow {self.flow!r} is unknown; use one of {BACKUP_FLOWS}")


@dataclass(frozen=True, slots=True)
class VmRestoreRequest:
    """Restore a snapshot into the engine as a new VM (or into an existing one)."""

    snapshot: str  # id or unique prefix
    name: str | None = None  # default: <original>-restored
    cluster: str | None = None  # default: the OVF's
    storage_domain: str | None = None  # default: each disk's recorded one
    flow: str = "imageio"  # imageio uploads, or attach (through the DataMover)
    engine: str | None = None
    disk: str | None = None  # only this disk (with into_vm)
    into_vm: str | None = None  # attach the disks to this existing VM instead


@dataclass(frozen=True, slots=True)
class ImageRestoreRequest:
    """Restore a snapshot's disks as local image files."""

    snapshot: str
    to: Path  # an image file (one disk) or a directory (several)
    disk: str | None = None
    image_format: str | None = None  # qcow2 | raw (default: each disk's recorded one)
    disks_at_once: int = DEFAULT_DISKS_AT_ONCE  # images written at once (one CPU pool)
