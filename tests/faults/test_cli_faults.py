"""I/O errors injected into the real CLI (``python -m tests.faults.fail_cli``): a backup
whose pack write, fsync, index commit, DiskMap, manifest or journal fails exits 1 with one
line naming the store and the errno — no traceback — leaves no temp file or helper behind,
and the next backup succeeds; every snapshot restores identical and verify is clean."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.local.source import _qemu_nbd_serving
from tests.faults.harness import record_case
from tests.integration.images import identical, make_fs_qcow2, reference
from tests.integration.test_backup_kill import ENV, ROOT, tessera, tmpdir_env  # noqa: F401

pytestmark = pytest.mark.integration

POINTS = [
    ("store.record.mid_write", 3),
    ("store.pack.mid_trailer", 1),
    ("store.pack.before_fsync", 1),
    ("store.index.before_commit", 1),
    ("store.diskmap.mid_write", 5),
    ("store.diskmap.before_fsync", 1),
    ("store.manifest.before_rename", 1),
    ("journal.before_rename", 3),
]


def failing(point: str, nth: int, kind: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.faults.fail_cli",
            point,
            str(nth),
            kind,
            "--",
            *map(str, args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )


# EIO everywhere; ENOSPC (also met for real on a tmpfs in test_full_disk) at a pack write
# and at SQLite's commit, whose full-disk error has its own wording.
CASES = [(p, n, "EIO") for p, n in POINTS] + [
    ("store.record.mid_write", 3, "ENOSPC"),
    ("store.index.before_commit", 1, "ENOSPC"),
]


@pytest.mark.parametrize(("point", "nth", "kind"), CASES, ids=lambda v: str(v))
def test_cli_write_fault(
    tmp_path: Path,
    tmpdir_env: Path,  # noqa: F811 - the imported fixture
    point: str,
    nth: int,
    kind: str,
) -> None:
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=32)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    proc = failing(point, nth, kind, "backup", "image", image, "--store", store, "--level", "full")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    output = proc.stdout + proc.stderr
    assert str(store) in output and kind in output, output
    assert not _qemu_nbd_serving(image)
    assert not list(store.rglob("*.tmp")), "a temp file was left behind"

    after = tessera("backup", "image", image, "--store", store, tmpdir=tmpdir_env)
    assert after.returncode == 0, after.stderr
    assert "dropped index entries" not in after.stderr
    snaps = json.loads(tessera("snapshots", "--store", store, "--json").stdout)
    assert len(snaps) == 1
    ref = reference(image, tmp_path / "ref.raw")
    target = tmp_path / "restored.qcow2"
    restored = tessera("restore", snaps[0]["id"], "--store", store, "--to", target)
    lost = int(restored.returncode != 0 or not identical(ref, target))
    verify = tessera("store", "verify", store, "--data")
    record_case(
        "CLI write faults",
        f"{point}#{nth} {kind}",
        detected=1,
        lost=lost,
        undetected=int(verify.returncode != 0),
        committed=len(snaps),
    )
    assert lost == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr
