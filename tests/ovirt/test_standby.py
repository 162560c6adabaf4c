"""Cold standby against the lab: `tessera standby refresh` (and ``refresh_standby`` in
process, as the daemon calls it) keeps a powered-off copy of vm1 as `vm1-standby`.

First run: a full restore (new VM, down, disks byte-identical to the snapshot). After guest
writes and an incremental backup, a refresh writes into the same standby disks exactly the
slots whose ids changed between the two snapshots (counted from their DiskMaps). A standby
VM deleted by an admin, a disk made illegal by a cancelled upload, and a refresh that
failed mid-write are all repaired by the next refresh (full run, or a full rewrite of the
dirty disk). Checked with the real ovirtsdk4 and `qemu-img compare`."""

import asyncio
import json
import re
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

from engine.config.loader import load as load_config
from engine.config.policy import Standby
from engine.jobs.journal import Journal
from engine.standby import state as st
from engine.standby.job import StandbyOutcome, refresh_standby
from engine.store.chunk_store import Store
from engine.util import failpoints
from engine.workers import ThreadCpuPool
from plugins.lab.engine.server import FakeEngine
from tests.integration.images import identical, qemu_io, reference
from tests.ovirt.test_backup_api_flow import SEED, lab, tessera
from tests.ovirt.test_restore_vm import view

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with the backup-API flow test

Lab = tuple[FakeEngine, Path, dict[str, Path]]
PASSPHRASE = b"flow-test"  # the lab fixture's TESSERA_PASSPHRASE
MiB = 1024 * 1024


async def backup(
    config: Path, tmp_path: Path, images: dict[str, Path], tag: str, level: str
) -> tuple[str, dict[str, Path]]:
    """Back vm1 up; returns the new snapshot id and raw copies of the disks at that time."""
    refs = {a: reference(p, tmp_path / f"{tag}-{a}.raw") for a, p in images.items()}
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--level", level)
    assert code == 0, out + err
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, out + err
    return json.loads(out)[-1]["id"], refs


def guest_writes(images: dict[str, Path], seed: int) -> None:
    """A few scattered writes: slots 3, 40, 41 (a 1 MiB write across two) and 200 of the
    OS disk, slot 7 of the raw data disk."""
    qemu_io(
        images["vm1_os"],
        f"write -P {seed} 3M 4k",
        f"write -P {seed + 1} {40 * MiB + 512 * 1024} 1M",
        f"write -P {seed + 2} 200M 64k",
    )
    with open(images["vm1_data"], "r+b") as f:
        f.seek(7 * MiB + 4096)
        f.write(bytes([seed]) * 8192)


def changed_slots(store_path: Path, old: str, new: str) -> dict[str, int]:
    """Per disk id: slots whose id differs between two snapshots."""
    with Store.open(store_path, passphrase=PASSPHRASE, writable=False) as store:
        a, b = store.manifest(old), store.manifest(new)
        out = {}
        for da in a.disks:
            db = next(d for d in b.disks if d.disk_id == da.disk_id)
            with store.open_diskmap(a, da) as ma, store.open_diskmap(b, db) as mb:
                pairs = zip(ma.iter_ids(), mb.iter_ids(), strict=True)
                out[da.disk_id] = sum(x != y for (_, x), (_, y) in pairs)
        return out


def per_disk(out: str) -> dict[str, tuple[int, int]]:
    """disk id → (slots written, slots unchanged) from the per-disk summary lines."""
    found = re.findall(r"restored disk (\S+):.*; (\d+) slots written, (\d+) unchanged", out)
    return {d: (int(w), int(s)) for d, w, s in found}


async def standby_matches(engine: FakeEngine, refs: dict[str, Path]) -> dict[str, object]:
    """The standby VM is down and each of its disks holds ``refs``; returns its facts."""
    now = await asyncio.to_thread(view, engine)
    standby = now.vms["vm1-standby"]
    assert standby["status"] == "down"
    assert standby["cluster"] == "Default"
    disks = standby["disks"]
    assert isinstance(disks, dict)
    assert set(disks) == set(refs)
    for alias, disk in disks.items():
        assert disk["status"] == "ok", alias
        assert identical(refs[alias], engine.activity.images[disk["id"]]), alias
    assert all(p.startswith("finished") for p in now.transfers), now.transfers
    return standby


def delete_vm_with_disks(engine: FakeEngine, name: str) -> None:
    conn = sdk.Connection(
        url=engine.url, username=SEED.username, password=SEED.password, ca_file=str(engine.ca_file)
    )
    try:
        vms = conn.system_service().vms_service()
        vm = vms.list(search=f"name={name}")[0]
        vms.vm_service(vm.id).remove()
    finally:
        conn.close()


def refresh_args(config: Path) -> list[str | Path]:
    return ["standby", "refresh", "vm1", "--config", config, "--cluster", "Default"]


async def test_full_then_refresh_of_changed_slots_then_admin_deletion(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    store_path = tmp_path / "store"
    s0, refs0 = await backup(config, tmp_path, images, "t0", "full")

    code, out, err = await tessera(*refresh_args(config), "--storage-domain", "data1")
    assert code == 0, out + err
    assert "full (first refresh)" in out
    first = await standby_matches(engine, refs0)
    assert f"standby VM vm1-standby id {first['id']}" in out
    first_disks = first["disks"]
    assert isinstance(first_disks, dict)

    code, out, err = await tessera(*refresh_args(config))
    assert code == 0, out + err
    assert f"already at snapshot {s0}" in out  # nothing new: no job, no transfer

    guest_writes(images, 0x51)
    s1, refs1 = await backup(config, tmp_path, images, "t1", "incremental")
    changed = changed_slots(store_path, s0, s1)
    assert sum(changed.values()) >= 5  # the writes above: 4 slots of the OS disk, 1 of data
    before = await asyncio.to_thread(view, engine)
    code, out, err = await tessera(*refresh_args(config))
    assert code == 0, out + err
    assert f"refresh to snapshot {s1}" in out
    written = per_disk(out)
    assert {d: w for d, (w, _) in written.items()} == changed
    total = sum(w + s for w, s in written.values())
    assert f"slots written {sum(changed.values())} / skipped {total - sum(changed.values())}" in out
    second = await standby_matches(engine, refs1)
    assert second["id"] == first["id"] and second["disks"] == first_disks  # the same disks
    after = await asyncio.to_thread(view, engine)
    assert after.disks == before.disks  # nothing created, nothing deleted

    # An admin deletes the standby VM (and its disks): the next refresh restores fully.
    await asyncio.to_thread(delete_vm_with_disks, engine, "vm1-standby")
    code, out, err = await tessera(*refresh_args(config))
    assert code == 0, out + err
    assert "full (standby VM vm1-standby" in out and "was deleted)" in out
    third = await standby_matches(engine, refs1)
    assert third["id"] != first["id"]
    with Store.open(store_path, passphrase=PASSPHRASE, writable=False) as store:
        state = st.load(store.path, store.manifest(s1).vm_id)
    assert state is not None
    assert state.standby_vm_id == third["id"] and state.snapshot_id == s1
    assert [h["mode"] for h in state.history] == ["full", "refresh", "full"]
    assert "was deleted" in state.history[-1]["reason"]


async def refresh_in_process(store_path: Path, config: Path) -> StandbyOutcome:
    """``refresh_standby`` as the daemon calls it, with the store open only meanwhile."""
    section = load_config(config, config.parent / "conf.d").engine()
    standby = Standby(peer="local", cluster="Default", storage_domain="data1")
    with Store.open(store_path, passphrase=PASSPHRASE, writable=True) as store:
        pool = ThreadCpuPool(store.keys, store.config.chunk_size, workers=2, capacity=4)
        try:
            return await refresh_standby(
                store, pool, Journal(store.path / "journal"), section, "vm1", standby
            )
        finally:
            await pool.aclose()


def load_state(store_path: Path) -> st.StandbyState:
    with Store.open(store_path, passphrase=PASSPHRASE, writable=False) as store:
        vm_id = store.snapshots("vm1")[-1].vm_id
        state = st.load(store.path, vm_id)
    assert state is not None
    return state


async def test_failed_refreshes_are_repaired_by_the_next(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    store_path = tmp_path / "store"
    s0, refs0 = await backup(config, tmp_path, images, "t0", "full")
    first = await refresh_in_process(store_path, config)
    assert first.ok and first.mode == "full", first.summary()
    await standby_matches(engine, refs0)

    # 1. A failure after two chunks were written: the transfer is finalized, the disk dirty.
    guest_writes(images, 0x61)
    s1, refs1 = await backup(config, tmp_path, images, "t1", "incremental")
    hits = 0

    def fail_third_write(name: str) -> None:
        nonlocal hits
        if name == "restore.chunk.written":
            hits += 1
            if hits == 3:
                raise RuntimeError("injected failure mid-refresh")

    failpoints.install(fail_third_write)
    try:
        failed = await refresh_in_process(store_path, config)
    finally:
        failpoints.install(None)
    assert not failed.ok
    assert failed.restore is not None
    assert "injected failure mid-refresh" in (failed.restore.record.error or "")
    state = load_state(store_path)
    assert state.snapshot_id == s0  # not advanced
    dirty = [d for d, disk in state.disks.items() if disk.dirty]
    assert len(dirty) == 1
    now = await asyncio.to_thread(view, engine)
    assert all(p == "finished_success" for p in now.transfers[-1:]), now.transfers
    assert not any(p.startswith(("initializing", "transferring")) for p in now.transfers)

    repaired = await refresh_in_process(store_path, config)
    assert repaired.ok and repaired.mode == "refresh", repaired.summary()
    assert repaired.restore is not None
    changed = changed_slots(store_path, s0, s1)
    for stats in repaired.restore.disks:
        slots = -(-stats.disk_size // MiB)
        if stats.disk_id in dirty:  # no base: every slot written
            assert (stats.slots_written, stats.slots_skipped) == (slots, 0)
        else:
            assert stats.slots_written == changed[stats.disk_id]
    await standby_matches(engine, refs1)
    assert load_state(store_path).snapshot_id == s1

    # 2. Transfers that never start: cancelled, the disk illegal; the next run is full.
    guest_writes(images, 0x71)
    s2, refs2 = await backup(config, tmp_path, images, "t2", "incremental")
    engine.faults.pause_transfers = True
    try:
        paused = await refresh_in_process(store_path, config)
    finally:
        engine.faults.pause_transfers = False
    assert not paused.ok
    assert load_state(store_path).snapshot_id == s1
    now = await asyncio.to_thread(view, engine)
    assert all(p.startswith("finished") for p in now.transfers), now.transfers
    old_id = now.vms["vm1-standby"]["id"]

    again = await refresh_in_process(store_path, config)
    assert again.ok and again.mode == "full", again.summary()
    assert again.reason is not None and "illegal" in again.reason
    standby = await standby_matches(engine, refs2)
    assert standby["id"] != old_id
    now = await asyncio.to_thread(view, engine)
    assert [n for n in now.vms if n.startswith("vm1-standby")] == ["vm1-standby"]
    assert load_state(store_path).snapshot_id == s2
