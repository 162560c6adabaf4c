"""The record of a restore check beside its snapshot (``engine.restore.record``) — read back,
unreadable without a traceback, never torn by a failing write (ENOSPC or EIO at each of
``atomic_write``'s failpoints) —, what a checker's exit status means (``engine.restore.fsck``)
and the expected paths a check takes.
The checks themselves run in an appliance: ``tests/integration/test_check.py``; which kernel
device a checker opens is tested here on the names libguestfs gives (the kernel's order, which
decides when they differ, cannot be chosen from outside the appliance)."""

import json
import os
from dataclasses import replace

import pytest

from engine.cli.main import main
from engine.core.errors import ConfigError, SnapshotNotFound, StoreWriteError
from engine.restore.check import check_expected
from engine.restore.fsck import _kernel_path, _meaning
from engine.restore.record import (
    RECORD_NAME,
    CheckRecord,
    RecordNotSaved,
    UnreadableRecord,
    read_record,
    record_cell,
    record_path,
    write_record,
)
from engine.restore.tree import FsCheck, PathCheck
from engine.store.chunk_store import Store
from tests.conftest import StoreFactory
from tests.faults.harness import FAULTS, Inject, installed
from tests.helpers import write_snapshot


def failed_record(snapshot: str) -> CheckRecord:
    return CheckRecord(
        snapshot=snapshot,
        time="2026-12-07T19:00:00+00:00",
        outcome="failed",
        duration=41.5,
        version="0.1.0",
        disks=["web1_os"],
        filesystems=[
            FsCheck("sda1", "/dev/sda1", "ext4", "web1_os", "failed", "e2fsck -f -n", 4, "x", "y"),
            FsCheck("sda2", "/dev/sda2", "swap", "web1_os", "unchecked", problem="no checker"),
        ],
        paths=[PathCheck("/sda1/etc/hostname", True, "file"), PathCheck("/sda1/x", False)],
        problems=["sda1 (ext4): x", "missing /sda1/x"],
    )


def test_a_record_is_kept_beside_its_snapshot_and_read_back(make_store: StoreFactory) -> None:
    store = make_store()
    manifest = write_snapshot(store, "vm", {"d": bytes(4096)})
    sid = manifest.snapshot_id
    assert read_record(store.layout, sid) is None and record_cell(None) == ""
    record = failed_record(sid)
    write_record(store.layout, record)
    assert record_path(store.layout, sid) == store.layout.snapshot_dir(sid) / RECORD_NAME
    assert read_record(store.layout, sid) == record
    assert record_cell(record) == "FAILED 2026-12-07"
    assert record.summary() == (
        "failed: sda1 (ext4): x; missing /sda1/x "
        "(1 of 2 filesystems checked, 1 of 2 expected paths present)"
    )
    assert store.manifest(sid) == manifest  # the manifest is not touched


def test_a_record_is_not_written_for_a_snapshot_that_is_gone(make_store: StoreFactory) -> None:
    store = make_store()
    sid = write_snapshot(store, "vm", {"d": bytes(4096)}).snapshot_id
    store.layout.manifest(sid).unlink()
    with pytest.raises(SnapshotNotFound):
        write_record(store.layout, failed_record(sid))
    assert not record_path(store.layout, sid).exists()


SECRET = "hunter2-in-the-record"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty (truncated)"),
        (b"\n  \n", "empty (truncated)"),
        (b'{"snapshot": "' + SECRET.encode(), "not JSON (line 1, column 14)"),
        (b"\xff\xfe" + SECRET.encode(), "not UTF-8 text"),
        (f'["{SECRET}"]'.encode(), "not a JSON object"),
        (b'{"snapshot": "S", "time": 5, "outcome": "passed", "duration": 1}', "field 'time'"),
        (b'{"snapshot": "S", "time": "t", "outcome": "' + SECRET.encode() + b'", "duration": 1}',
         "field 'outcome' is none of passed, failed, error"),
        (b'{"snapshot": "S", "time": "t", "outcome": "passed", "duration": "1"}',
         "field 'duration' is missing or not a number"),
        (b'{"snapshot": "S", "time": "t", "outcome": "passed", "duration": 1, "filesystems":'
         b' [{"' + SECRET.encode() + b'": 1}]}', "a filesystem or path entry has unknown fields"),
        (b'{"snapshot": "S", "time": "t", "outcome": "passed", "duration": 1, "paths": {}}',
         "field 'paths' is missing or not a list"),
        (b'{"snapshot": "other", "time": "t", "outcome": "passed", "duration": 1}',
         "it is the record of another snapshot"),
        (b"[" * 100_000, "not JSON"),
    ],
)  # fmt: skip
def test_an_unreadable_record_is_shown_as_such_naming_the_file_not_its_content(
    make_store: StoreFactory, content: bytes, why: str
) -> None:
    store: Store = make_store()
    sid = write_snapshot(store, "vm", {"d": bytes(4096)}).snapshot_id
    path = record_path(store.layout, sid)
    path.write_bytes(content.replace(b'"S"', json.dumps(sid).encode()))
    found = read_record(store.layout, sid)
    assert isinstance(found, UnreadableRecord), found
    assert found.reason.startswith(f"{path}: "), found.reason
    assert why in found.reason, found.reason
    assert SECRET not in found.reason
    assert record_cell(found) == "UNREADABLE"
    assert found.doc() == {"outcome": "unreadable", "error": found.reason}
    # the next check replaces it
    write_record(store.layout, failed_record(sid))
    assert read_record(store.layout, sid) == failed_record(sid)


def test_a_record_that_is_a_directory_is_unreadable_not_a_traceback(
    make_store: StoreFactory,
) -> None:
    store: Store = make_store()
    sid = write_snapshot(store, "vm", {"d": bytes(4096)}).snapshot_id
    record_path(store.layout, sid).mkdir()
    found = read_record(store.layout, sid)
    assert isinstance(found, UnreadableRecord)
    assert found.reason == f"{record_path(store.layout, sid)}: Is a directory"


POINTS = ("mid_write", "before_fsync", "before_rename", "after_rename", "before_dir_fsync")


@pytest.mark.parametrize("kind", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("point", POINTS)
def test_a_record_write_that_fails_names_the_file_and_errno_and_tears_nothing(
    make_store: StoreFactory, point: str, kind: str
) -> None:
    """A failure at each window of the atomic write: the error names the record's file and
    the errno and carries the verdict; the record on disk is the earlier one or (a failure
    after the rename) the new one, whole either way; no temporary file is left."""
    store: Store = make_store()
    sid = write_snapshot(store, "vm", {"d": bytes(4096)}).snapshot_id
    earlier = failed_record(sid)
    write_record(store.layout, earlier)
    before = record_path(store.layout, sid).read_bytes()
    new = replace(earlier, outcome="passed", problems=[], time="2026-12-08T05:00:00+00:00")
    with installed(Inject(f"restore.check_record.{point}", 1, kind)):
        with pytest.raises(RecordNotSaved) as raised:
            write_record(store.layout, new)
    error = raised.value
    assert isinstance(error, StoreWriteError)
    assert error.record == new
    assert str(record_path(store.layout, sid)) in str(error)
    assert f"restore-check record of snapshot {sid}" in str(error)
    assert f"{os.strerror(FAULTS[kind])} ({kind})" in str(error), str(error)
    after = read_record(store.layout, sid)
    assert after == (new if point in ("after_rename", "before_dir_fsync") else earlier)
    if after == earlier:
        assert record_path(store.layout, sid).read_bytes() == before
    assert sorted(
        p.name for p in store.layout.snapshot_dir(sid).iterdir() if "check" in p.name
    ) == [RECORD_NAME]


@pytest.mark.parametrize(
    ("tool", "status", "meaning"),
    [
        ("e2fsck", 4, "exit 4 (filesystem errors left uncorrected)"),
        ("e2fsck", 12, "exit 12 (filesystem errors left uncorrected, operational error)"),
        ("xfs_repair", 1, "exit 1 (corruption found)"),
        ("xfs_repair", 2, "exit 2 (the log needs replaying (dirty log))"),
        ("ntfsfix", 1, "exit 1 (problems found)"),
    ],
)
def test_a_checker_s_exit_status_is_named(tool: str, status: int, meaning: str) -> None:
    assert _meaning(tool, status) == meaning


@pytest.mark.parametrize("path", ["etc/hostname", "/", "/sda1/../etc", "sda1"])
def test_an_expected_path_must_be_one_of_the_tree(
    path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="give an absolute path of the tree"):
        check_expected([path])
    # the command says so before it opens a store or boots anything
    code = main(["snapshots", "check", "3f2a", "--store", "/nonexistent", "--expect", path])
    assert code == 2
    assert "give an absolute path of the tree" in capsys.readouterr().err


class TwoDisks:
    """libguestfs's answers for two added drives, the second partitioned."""

    def list_devices(self) -> list[str]:
        return ["/dev/sda", "/dev/sdb"]

    def list_partitions(self) -> list[str]:
        return ["/dev/sdb1", "/dev/sdb2"]

    def part_to_dev(self, partition: str) -> str:
        return partition[:-1]

    def part_to_partnum(self, partition: str) -> int:
        return int(partition[-1])

    def device_index(self, device: str) -> int:
        return self.list_devices().index(device)


@pytest.mark.parametrize(
    ("device", "path"),
    [
        ("/dev/sda", "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_hd0"),
        ("/dev/sdb2", "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_hd1-part2"),
        ("/dev/vg0/lv0", "/dev/vg0/lv0"),
    ],
)
def test_a_checker_opens_the_drive_by_its_index_not_libguestfs_s_name(
    device: str, path: str
) -> None:
    assert _kernel_path(TwoDisks(), device) == path
