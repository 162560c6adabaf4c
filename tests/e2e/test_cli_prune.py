"""``tessera prune``, ``snapshots protect|unprotect`` and ``store status`` end to end, on a
store holding real backups of small qcow2 images (two VMs cloned from one template)."""

import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.store.chunk_store import Store
from tests.cli import Cli
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.e2e

CLI = Cli(passphrase="test-pass")
tessera = CLI.run
ok = CLI.ok

K = 1024


def snapshots(store: Path, vm: str | None = None) -> list[dict]:  # type: ignore[type-arg]
    extra = ["--vm", vm] if vm else []
    return json.loads(ok("snapshots", "--store", store, "--json", *extra))  # type: ignore[no-any-return]


@pytest.fixture
def two_vms(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A store with vm-a backed up three times (changing between) and its clone vm-b once."""
    store = tmp_path / "store"
    ok("store", "init", store, "--chunk-size", "256k", "--pack-size", "8M")
    template = make_fs_qcow2(tmp_path, "template")
    a, b = tmp_path / "vm-a.qcow2", tmp_path / "vm-b.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", template, a)
    run("qemu-img", "convert", "-O", "qcow2", template, b)
    # vm-b: two slots of its own (one whole slot, one partly rewritten)
    qemu_io(b, "write -P 0x98 50M 256k", "write -P 0x99 12M 64k")
    ok("backup", "image", a, b, "--store", store)
    for n in (1, 2):  # the same slot each time: each backup has a version of its own
        qemu_io(a, f"write -P 0x{0x10 + n:x} 20M 256k")
        ok("backup", "image", a, "--store", store)
    return store, a, b


def test_protect_prune_and_status(tmp_path: Path, two_vms: tuple[Path, Path, Path]) -> None:
    store, a, _b = two_vms
    snaps_a = snapshots(store, "vm-a.qcow2")
    assert len(snaps_a) == 3 and not any(s["protected"] for s in snaps_a)
    oldest, middle, newest = (s["id"] for s in snaps_a)

    # protect the oldest by a prefix; the listing shows it
    assert f"snapshot {oldest} protected" in ok(
        "snapshots", "protect", oldest[:8], "--store", store
    )
    assert "already protected" in ok("snapshots", "protect", oldest, "--store", store)
    listing = {s["id"]: s["protected"] for s in snapshots(store)}
    assert listing[oldest] is True and listing[middle] is False
    assert "yes" in ok("snapshots", "--store", store)

    # no rules: refused, nothing touched
    proc = tessera("prune", "--store", store)
    assert proc.returncode == 2 and "no keep rules given" in proc.stderr
    proc = tessera("prune", "--store", store, "--keep-within", "3x")
    assert proc.returncode == 2 and "not a duration: '3x'" in proc.stderr

    # dry run: the plan with reasons, nothing removed
    plan = json.loads(ok("prune", "--store", store, "--keep-last", "1", "--dry-run", "--json"))
    actions = {d["id"]: (d["action"], d["reasons"]) for d in plan["decisions"]}
    assert actions[oldest] == ("keep", ["protected"])
    assert actions[middle] == ("remove", ["no rule keeps it"])
    assert actions[newest] == ("keep", ["newest of VM", "keep-last 1/1"])
    assert plan["dry_run"] is True and plan["removed"] == []
    assert len(snapshots(store)) == 4
    human = ok("prune", "--store", store, "--keep-last", "1", "--dry-run", "--tz", "UTC")
    assert "rules: keep-last 1" in human and "would remove 1 snapshots, keep 3" in human
    assert f"remove  {middle}" in human

    status = json.loads(ok("store", "status", store, "--json"))
    vms = {v["name"]: v for v in status["vms"]}
    middle_frees = next(
        s["frees_bytes"] for s in vms["vm-a.qcow2"]["snapshot_usage"] if s["id"] == middle
    )
    assert status["unreferenced"] == {"chunks": 0, "bytes": 0}

    # prune for real
    out = ok("prune", "--store", store, "--keep-last", "1", "--tz", "UTC")
    assert "removed 1 snapshots, kept 3" in out
    assert [s["id"] for s in snapshots(store, "vm-a.qcow2")] == [oldest, newest]
    assert (store / "removed" / middle / "removal.json").exists()
    assert tessera("store", "verify", store).returncode == 0
    again = json.loads(ok("prune", "--store", store, "--keep-last", "1", "--json"))
    assert again["removed"] == [] and all(d["action"] == "keep" for d in again["decisions"])

    status = json.loads(ok("store", "status", store, "--json"))
    assert status["removed_snapshots"] == 1
    assert middle_frees > 0
    assert status["unreferenced"]["bytes"] == middle_frees  # what status said it would free

    # the undo window: listed, and brought back by a prefix (issue 16: no command did)
    removed = json.loads(ok("snapshots", "removed", "--store", store, "--json"))
    assert [(r["id"], r["vm"]) for r in removed] == [(middle, "vm-a.qcow2")]
    assert middle in ok("snapshots", "removed", "--store", store)
    proc = tessera("snapshots", "unremove", newest, "--store", store)
    assert proc.returncode == 2 and "is not among the removed snapshots" in proc.stderr
    assert f"snapshot {middle} is back" in ok("snapshots", "unremove", middle[:8], "--store", store)
    assert [s["id"] for s in snapshots(store, "vm-a.qcow2")] == [oldest, middle, newest]
    assert json.loads(ok("snapshots", "removed", "--store", store, "--json")) == []
    assert tessera("store", "verify", store).returncode == 0
    ok("prune", "--store", store, "--keep-last", "1")  # removed again, for what follows

    # the newest still restores bit for bit
    ref = reference(a, tmp_path / "a-now.raw")
    ok("restore", newest, "--store", store, "--to", tmp_path / "restored.qcow2")
    assert identical(ref, tmp_path / "restored.qcow2")

    # unprotect: the next prune removes it
    assert f"snapshot {oldest} unprotected" in ok(
        "snapshots", "unprotect", oldest, "--store", store
    )
    out = ok("prune", "--store", store, "--vm", "vm-a.qcow2", "--keep-last", "1")
    assert "removed 1 snapshots" in out
    assert [s["id"] for s in snapshots(store, "vm-a.qcow2")] == [newest]
    proc = tessera("prune", "--store", store, "--vm", "nosuch", "--keep-last", "1")
    assert proc.returncode == 2 and "VM nosuch has no snapshots" in proc.stderr


def test_status_shared_and_unique_bytes_of_clones(two_vms: tuple[Path, Path, Path]) -> None:
    store, _a, _b = two_vms
    status = json.loads(ok("store", "status", store, "--json"))
    vms = {v["name"]: v for v in status["vms"]}
    a, b = vms["vm-a.qcow2"], vms["vm-b.qcow2"]
    # vm-b's own bytes are exactly its two rewritten 256 KiB slots; the rest is shared
    assert b["unique_chunks"] == 2 and b["unique_bytes"] == 512 * K
    assert b["shared_bytes"] == b["referenced_bytes"] - 512 * K
    (b_snap,) = b["snapshot_usage"]
    assert b_snap["unique_bytes"] == 512 * K and b_snap["frees_bytes"] == b["frees_bytes"]
    # vm-a alone has its two new slots and the template's data at 12M (the template's 50M
    # slot is all zeros: it stores nothing, so vm-b's rewrite of it frees nothing of vm-a's)
    assert a["unique_chunks"] == 3 and a["unique_bytes"] == 3 * 256 * K
    # what the two VMs share, seen from either side, is the same
    assert a["referenced_bytes"] - a["unique_bytes"] == b["referenced_bytes"] - b["unique_bytes"]
    # the second and third backups each have their own version of the slot at 20M; the
    # first's template slots are all still in vm-b
    first, second, third = a["snapshot_usage"]
    assert first["unique_bytes"] == 0 and first["frees_bytes"] == 0
    assert second["unique_bytes"] == third["unique_bytes"] == 256 * K
    assert second["frees_bytes"] > 0
    # totals agree with the index: nothing unreferenced, stored bytes are the index's
    total = status["total"]
    assert total["stored_bytes"] == status["index"]["stored_bytes"]
    assert total["chunks"] == status["index"]["chunks"]
    assert total["logical_bytes"] == a["logical_bytes"] + b["logical_bytes"]
    with Store.open(store, passphrase=b"test-pass", writable=False) as s:
        assert s.info().logical_bytes == total["data_bytes"]
    human = ok("store", "status", store, "--snapshots")
    assert "vm-b.qcow2" in human and "FREES" in human and "512.0 KiB" in human


def test_prune_runs_while_a_writer_holds_the_store(two_vms: tuple[Path, Path, Path]) -> None:
    store, _a, _b = two_vms
    with Store.open(store, passphrase=b"test-pass"):  # a backup in progress holds the lock
        out = ok("prune", "--store", store, "--keep-last", "1")
        assert "removed 2 snapshots" in out
        proc = tessera("backup", "image", _a, "--store", store)
        assert proc.returncode != 0 and "opened for writing by another process" in proc.stderr


def test_one_time_rule_local_with_offset(two_vms: tuple[Path, Path, Path]) -> None:
    """Every command shows a snapshot's time alike: in the local zone (TZ) with its offset
    (issue 16: snapshots and store status showed UTC, prune local time without offset)."""
    store, _a, _b = two_vms
    zone = {"TZ": "Asia/Kolkata"}  # +05:30: neither UTC nor a whole hour off it
    snap = snapshots(store, "vm-a.qcow2")[0]
    local = datetime.fromisoformat(snap["time"]).astimezone(ZoneInfo("Asia/Kolkata"))
    shown = local.strftime("%Y-%m-%d %H:%M:%S +0530")
    listing = ok("snapshots", "--store", store, env=zone).splitlines()[1:]
    assert any(line.startswith(f"{snap['id']}  {shown}  vm-a.qcow2") for line in listing)
    plan = ok("prune", "--store", store, "--keep-last", "1", "--dry-run", env=zone)
    assert f"{snap['id']:<16}  {shown}  " in plan
    status = ok("store", "status", store, "--snapshots", env=zone)
    assert f"{snap['id']:<16} {shown}  " in status
    utc = ok("snapshots", "--store", store, env={"TZ": "UTC"})
    assert local.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000") in utc
