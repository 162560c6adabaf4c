"""The record of a restore point's last check, kept beside it in the store.

``snapshots/<id>/restore-check.json`` (JSON, written atomically: tmp + fsync + rename + fsync
dir) holds what ``engine.restore.check`` found the last time it checked the snapshot; a new
check replaces it. Like the ``protected`` and ``damaged`` marks it is a file beside the
manifest, not part of it: the manifest is immutable and content-checked, and a check adds
nothing to the restore point itself. It moves with the snapshot directory (prune, unremove)
and is not replicated (a check proves this copy, not the peer's).

Writing it is allowed on a store opened read-only (as ``set_protected`` is): it is one small
file, not store data, written while the snapshot is share-locked (``Store.reading_snapshot``),
so a prune cannot move the directory meanwhile. Nothing here boots an appliance: listing
records (``tessera snapshots``, the API) imports only this module.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from engine.core.errors import SnapshotNotFound
from engine.restore.tree import FsCheck, PathCheck
from engine.store.layout import Layout
from engine.util.fs import atomic_write

RECORD_NAME: Final = "restore-check.json"
RECORD_FORMAT: Final = 1

Outcome = Literal["passed", "failed", "error"]


@dataclass(frozen=True)
class CheckRecord:
    """One check of one snapshot: ``passed`` when every filesystem found was checked clean
    (or has no checker) and every expected path is there; ``failed`` with ``problems``
    saying why; ``error`` when the check itself could not run (``error`` says why)."""

    snapshot: str
    time: str  # when it started, ISO 8601 UTC
    outcome: Outcome
    duration: float  # seconds
    version: str  # tessera's
    disks: list[str] = field(default_factory=list)  # the disk names checked
    filesystems: list[FsCheck] = field(default_factory=list)
    paths: list[PathCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each
    error: str = ""

    def doc(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT} | asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "CheckRecord":
        return cls(
            snapshot=doc["snapshot"],
            time=doc["time"],
            outcome=doc["outcome"],
            duration=doc["duration"],
            version=doc.get("version", ""),
            disks=list(doc.get("disks", [])),
            filesystems=[FsCheck(**f) for f in doc.get("filesystems", [])],
            paths=[PathCheck(**p) for p in doc.get("paths", [])],
            problems=list(doc.get("problems", [])),
            error=doc.get("error", ""),
        )

    def summary(self) -> str:
        """One line: ``passed: 4 filesystems checked, 2 paths present`` or what failed."""
        if self.outcome == "error":
            return f"error: {self.error}"
        checked = sum(1 for f in self.filesystems if f.state != "unchecked")
        present = sum(1 for p in self.paths if p.present)
        counts = f"{checked} of {len(self.filesystems)} filesystems checked"
        counts += f", {present} of {len(self.paths)} expected paths present" if self.paths else ""
        if self.outcome == "passed":
            return f"passed: {counts}"
        return f"failed: {'; '.join(self.problems)} ({counts})"


def record_path(layout: Layout, snapshot_id: str) -> Path:
    return layout.snapshot_dir(snapshot_id) / RECORD_NAME


def write_record(layout: Layout, record: CheckRecord) -> None:
    """Publish ``record`` beside its snapshot, replacing the previous one. Raises
    SnapshotNotFound when the snapshot is gone (the caller should hold its share lock)."""
    if not layout.manifest(record.snapshot).exists():
        raise SnapshotNotFound(snapshot=record.snapshot, reason="no manifest (removed?)")
    data = json.dumps(record.doc(), indent=1).encode() + b"\n"
    atomic_write(record_path(layout, record.snapshot), data, "restore.check_record")


def read_record(layout: Layout, snapshot_id: str) -> CheckRecord | None:
    """The snapshot's last check, or None when it was never checked (or the record cannot
    be read: a hand-edited file is not a check)."""
    try:
        doc = json.loads(record_path(layout, snapshot_id).read_bytes())
        return CheckRecord.from_doc(doc)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


def record_cell(record: CheckRecord | None) -> str:
    """The ``CHECKED`` column of ``tessera snapshots``: ``ok 2026-12-07``, ``FAILED …``,
    ``ERROR …``, or empty when never checked."""
    if record is None:
        return ""
    word = {"passed": "ok", "failed": "FAILED", "error": "ERROR"}.get(record.outcome, "?")
    return f"{word} {record.time[:10]}"
