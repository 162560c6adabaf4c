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

Faults: a record that cannot be written (a full or failing store filesystem) raises
``RecordNotSaved``, which carries what the check found, so the verdict still reaches whoever
asked; the previous record stays whole (the new one was never renamed over it) and no
temporary file is left (a SIGKILL between the write and the rename leaves
``restore-check.json.tmp``, which nothing reads, the next check overwrites and a writable
open removes). A record that is there but cannot be read (truncated, edited, not ours) is an
``UnreadableRecord``: listed as such, never a traceback, and the next check replaces it.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from engine.core.errors import SnapshotNotFound, StoreWriteError
from engine.restore.tree import FsCheck, PathCheck
from engine.store.failure import write_failure
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
        """The record ``doc`` holds; ValueError (TypeError: not an object) naming the first
        field missing or of the wrong kind (never its content: an edited file holds anything)."""
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        outcome = _field(doc, "outcome", str)
        if outcome not in get_args(Outcome):
            raise ValueError("field 'outcome' is none of passed, failed, error")
        try:
            return cls(
                snapshot=_field(doc, "snapshot", str),
                time=_field(doc, "time", str),
                outcome=outcome,
                duration=float(_field(doc, "duration", int | float)),
                version=_field(doc, "version", str, ""),
                disks=_strings(doc, "disks"),
                filesystems=[FsCheck(**f) for f in _objects(doc, "filesystems")],
                paths=[PathCheck(**p) for p in _objects(doc, "paths")],
                problems=_strings(doc, "problems"),
                error=_field(doc, "error", str, ""),
            )
        except TypeError:  # an entry with fields FsCheck or PathCheck does not have
            raise ValueError("a filesystem or path entry has unknown fields") from None

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


def _field(doc: dict[str, Any], name: str, kind: Any, default: Any = None) -> Any:
    value = doc.get(name, default)
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {name!r} is missing or not a {_KIND_NAMES.get(kind, 'value')}")
    return value


_KIND_NAMES: Final[dict[Any, str]] = {str: "string", int | float: "number", list: "list"}


def _strings(doc: dict[str, Any], name: str) -> list[str]:
    values: list[Any] = _field(doc, name, list, [])
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"field {name!r} is not a list of strings")
    return values


def _objects(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    values: list[Any] = _field(doc, name, list, [])
    if not all(isinstance(v, dict) for v in values):
        raise ValueError(f"field {name!r} is not a list of objects")
    return values


@dataclass(frozen=True)
class UnreadableRecord:
    """A record file that is there but cannot be read: ``reason`` names the file and what is
    wrong with it (never its content). Shown as such (``UNREADABLE``; in documents
    ``{"outcome": "unreadable", "error": …}``); the next check replaces it."""

    snapshot: str
    reason: str

    def doc(self) -> dict[str, Any]:
        return {"outcome": "unreadable", "error": self.reason}

    def summary(self) -> str:
        return f"unreadable: {self.reason}"


LastCheck = CheckRecord | UnreadableRecord | None  # what ``read_record`` finds


class RecordNotSaved(StoreWriteError):
    """A check ran but its record could not be written (a full or failing filesystem):
    the message names the record's file and the errno (``engine.store.failure``); the field
    ``record`` is what the check found, for the caller to report all the same. The previous
    record, if any, is left whole."""

    @property
    def record(self) -> CheckRecord:
        record = self.fields["record"]
        assert isinstance(record, CheckRecord)
        return record


def record_path(layout: Layout, snapshot_id: str) -> Path:
    return layout.snapshot_dir(snapshot_id) / RECORD_NAME


def write_record(layout: Layout, record: CheckRecord) -> None:
    """Publish ``record`` beside its snapshot, replacing the previous one. Raises
    SnapshotNotFound when the snapshot is gone (the caller should hold its share lock),
    RecordNotSaved when the file cannot be written (the previous one left as it was)."""
    if not layout.manifest(record.snapshot).exists():
        raise SnapshotNotFound(snapshot=record.snapshot, reason="no manifest (removed?)")
    data = json.dumps(record.doc(), indent=1).encode() + b"\n"
    path = record_path(layout, record.snapshot)
    try:
        atomic_write(path, data, "restore.check_record")
    except OSError as e:
        what = f"the restore-check record of snapshot {record.snapshot} ({path})"
        failure = write_failure(layout.root, what, e, needed=len(data))
        raise RecordNotSaved(**failure.fields, record=record) from e


def read_record(layout: Layout, snapshot_id: str) -> LastCheck:
    """The snapshot's last check: None when it was never checked, an ``UnreadableRecord``
    when its file cannot be read or is not a record of this snapshot (truncated, edited, an
    I/O error): listing never fails on it."""
    path = record_path(layout, snapshot_id)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return UnreadableRecord(snapshot_id, f"{path}: {e.strerror or e}")
    try:
        if not raw.strip():
            raise ValueError("empty (truncated)")
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        except json.JSONDecodeError as e:  # its message quotes no content, its place only
            raise ValueError(f"not JSON (line {e.lineno}, column {e.colno})") from None
        except RecursionError:
            raise ValueError("not JSON (nested too deep)") from None
        record = CheckRecord.from_doc(doc)
        if record.snapshot != snapshot_id:
            raise ValueError("it is the record of another snapshot")
    except (ValueError, TypeError) as e:
        return UnreadableRecord(snapshot_id, f"{path}: {e}; the next check replaces it")
    return record


def record_cell(record: LastCheck) -> str:
    """The ``CHECKED`` column of ``tessera snapshots``: ``ok 2026-12-07``, ``FAILED …``,
    ``ERROR …``, ``UNREADABLE`` (the record file is damaged), or empty when never checked."""
    if record is None:
        return ""
    if isinstance(record, UnreadableRecord):
        return "UNREADABLE"
    word = {"passed": "ok", "failed": "FAILED", "error": "ERROR"}.get(record.outcome, "?")
    return f"{word} {record.time[:10]}"
