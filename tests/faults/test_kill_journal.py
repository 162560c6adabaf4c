"""SIGKILL at every step the job journal records, and between spawning a helper and
recording it: a real ``tessera backup image`` (qemu-nbd, bitmaps, the store) is killed there,
then the next command recovers. Whatever the step, no qemu-nbd and no private directory
outlives the killed job, the killed backup is either a committed snapshot or nothing, the
next backup succeeds, every snapshot restores identical, and a data verify is clean."""

import json
from pathlib import Path

import pytest

from plugins.local.source import _qemu_nbd_serving
from tests.faults.harness import record_case
from tests.faults.test_job_faults import recorded
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference
from tests.integration.test_backup_kill import eventually, tessera, tmpdir_env  # noqa: F401

pytestmark = pytest.mark.integration


def points() -> list[tuple[str, int]]:
    saves = recorded()["journal.before_rename"]  # one per journal save of an incremental
    out = [("journal.after_rename", n) for n in range(1, saves + 1)]
    out += [("journal.mid_write", 1), ("journal.mid_write", saves)]  # a torn record
    out += [("helper.spawned", 1)]  # qemu-nbd runs, its pid not yet journaled
    return out


@pytest.mark.parametrize(("point", "nth"), points(), ids=lambda v: str(v))
def test_kill_at_journal_step(
    tmp_path: Path,
    tmpdir_env: Path,  # noqa: F811 - the imported fixture
    point: str,
    nth: int,
) -> None:
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=32)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    first = tessera("backup", "image", image, "--store", store, tmpdir=tmpdir_env)
    assert first.returncode == 0, first.stderr
    refs = {0: reference(image, tmp_path / "ref0.raw")}
    qemu_io(image, "write -P 0x61 1M 2M", "write -P 0x62 20M 4M")
    refs[1] = reference(image, tmp_path / "ref1.raw")

    killed = tessera(
        "backup", "image", image, "--store", store, kill_at=(point, nth), tmpdir=tmpdir_env
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    # the parent-death signal takes the helper with the killed process
    assert eventually(lambda: not _qemu_nbd_serving(image)), "qemu-nbd outlived its job"

    after = tessera("backup", "image", image, "--store", store, tmpdir=tmpdir_env)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "Traceback" not in after.stderr
    assert not list(tmpdir_env.glob("tessera-nbd-*")), "a helper's directory was left"
    records = [json.loads(p.read_text()) for p in (store / "journal").glob("*.json")]
    assert all(r["state"] in {"succeeded", "failed", "cancelled"} for r in records), records

    snaps = sorted(
        json.loads(tessera("snapshots", "--store", store, "--json").stdout),
        key=lambda s: s["time"],
    )
    assert len(snaps) in (2, 3)  # the killed backup committed, or left nothing
    lost = 0
    for n, snap in enumerate(snaps):
        target = tmp_path / f"restored-{n}.qcow2"
        proc = tessera("restore", snap["id"], "--store", store, "--to", target)
        lost += proc.returncode != 0 or not identical(refs[min(n, 1)], target)
    verify = tessera("store", "verify", store, "--data")
    record_case(
        "SIGKILL at journal steps",
        f"{point}#{nth}",
        detected=1,
        lost=lost,
        undetected=int(verify.returncode != 0),
        committed=len(snaps),
    )
    assert lost == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_kill_restore_at_every_journal_step(
    tmp_path: Path,
    tmpdir_env: Path,  # noqa: F811 - the imported fixture
) -> None:
    """A restore killed at its n-th journal save, for n = 1, 2, … until a run is not
    reached by the kill: each time the next restore to the same name recovers (the partial
    image and its qemu-nbd go) and writes an identical image."""
    store, image = tmp_path / "store", make_fs_qcow2(tmp_path, "vm", size_mib=32)
    assert tessera("store", "init", store, "--chunk-size", "256k").returncode == 0
    assert tessera("backup", "image", image, "--store", store).returncode == 0
    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
    target = tmp_path / "restored.qcow2"
    partial = target.with_name(target.name + ".tessera-partial")
    n = 0
    while True:
        n += 1
        killed = tessera(
            "restore",
            snap,
            "--store",
            store,
            "--to",
            target,
            kill_at=("journal.after_rename", n),
            tmpdir=tmpdir_env,
        )
        if killed.returncode == 0:  # the restore ended before its n-th save: all covered
            break
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert eventually(lambda: not _qemu_nbd_serving(partial)), "qemu-nbd outlived its job"
        target.unlink(missing_ok=True)  # a restore killed after its last step finished
        again = tessera("restore", snap, "--store", store, "--to", target, tmpdir=tmpdir_env)
        assert again.returncode == 0, again.stdout + again.stderr
        ok = identical(image, target) and not partial.exists()
        assert not list(tmpdir_env.glob("tessera-nbd-*"))
        record_case(
            "SIGKILL at journal steps",
            f"restore journal.after_rename#{n}",
            detected=1,
            lost=int(not ok),
            committed=1,
        )
        assert ok
        target.unlink()
    assert n > 3, "the restore saved its journal fewer times than expected"
