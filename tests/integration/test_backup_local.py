"""Backups of real qcow2 images through the CLI: full, incremental, differential, restore
each point, qemu-img compare identical; clones dedup; a raw image always reads fully, and
directly: no qemu-nbd serves it while it is read (a qcow2 image beside it has one)."""

import json
from pathlib import Path

import pytest

from engine.jobs.backup import run_backup
from engine.jobs.journal import Journal
from engine.jobs.states import State
from engine.store.chunk_store import Store
from engine.util import failpoints
from engine.workers import ThreadCpuPool
from plugins.local.source import LocalImageSource
from tests.cli import Cli
from tests.conftest import StoreFactory
from tests.contract.harness import nbd_servers_of
from tests.helpers import read_disk
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.integration

CLI = Cli(passphrase="test-pass")
tessera = CLI.run
ok = CLI.ok


def snapshots(store: Path) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(ok("snapshots", "--store", store, "--json"))  # type: ignore[no-any-return]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    ok("store", "init", path, "--chunk-size", "256k", "--pack-size", "8M")
    return path


def test_full_incremental_differential_restore(tmp_path: Path, store: Path) -> None:
    image = make_fs_qcow2(tmp_path, "vm1")
    refs = [reference(image, tmp_path / "t0.raw")]
    out = ok("backup", "image", image, "--store", store, "--level", "incremental")
    assert "first backup of this VM: full instead of incremental" in out
    # Scattered 4 KiB writes, a clustered 3 MiB write and a discard.
    qemu_io(
        image,
        *(f"write -P 0x{i:02x} {i * 7}M 4k" for i in range(1, 12)),
        "write -P 0x33 40M 3M",
        "discard 60M 2M",
    )
    refs.append(reference(image, tmp_path / "t1.raw"))
    out = ok("backup", "image", image, "--store", store, "--level", "incremental")
    assert "level incremental" in out
    qemu_io(image, "write -P 0x44 80M 1M", "write -P 0x55 3M 8k")
    refs.append(reference(image, tmp_path / "t2.raw"))
    ok("backup", "image", image, "--store", store, "--level", "differential")
    snaps = snapshots(store)
    assert [s["level"] for s in snaps] == ["full", "incremental", "differential"]
    assert snaps[1]["parent"] == snaps[0]["id"] and snaps[2]["parent"] == snaps[0]["id"]
    for s in snaps:
        assert set(s) >= {"id", "time", "vm", "level", "disks", "size"}
        assert s["disks"][0]["size"] == 96 * 2**20
    # The incremental read only the slots it had to (dirty ones), not the whole disk.
    with Store.open(store, passphrase=b"test-pass", writable=False) as s:
        inc = s.manifest(snaps[1]["id"])
        assert inc.disks[0].attributes["read"] == "dirty"
    for i, (snap, ref) in enumerate(zip(snaps, refs, strict=True)):
        target = tmp_path / f"restored-{i}.qcow2"
        ok("restore", snap["id"][:8], "--store", store, "--to", target)
        assert identical(ref, target), f"snapshot {i} differs"
    assert ok("store", "verify", store, "--data").strip().endswith("ok")


def test_incremental_reads_only_dirty_slots(tmp_path: Path, store: Path) -> None:
    image = make_fs_qcow2(tmp_path, "vm1")
    ok("backup", "image", image, "--store", store, "--level", "full")
    qemu_io(image, "write -P 0x77 10M 4k", "write -P 0x78 30M 300k")  # 1 + 2 slots of 256 KiB
    out = ok("backup", "image", image, "--store", store)
    assert "read 768.0 KiB" in out  # 3 slots × 256 KiB


def test_bitmaps_are_the_checkpoint_chain(tmp_path: Path, store: Path) -> None:
    image = make_fs_qcow2(tmp_path, "vm1")
    ok("backup", "image", image, "--store", store, "--level", "full")
    ok("backup", "image", image, "--store", store)
    ok("backup", "image", image, "--store", store)
    info = json.loads(run("qemu-img", "info", "--output=json", image))
    names = [b["name"] for b in info["format-specific"]["data"]["bitmaps"]]
    snaps = snapshots(store)
    jobs = {s["id"]: s for s in snaps}
    assert len(names) == 2  # the last full's (for differentials) and the newest
    assert len(jobs) == 3


def test_missing_bitmap_falls_back_to_full_with_reason(tmp_path: Path, store: Path) -> None:
    image = make_fs_qcow2(tmp_path, "vm1")
    ok("backup", "image", image, "--store", store, "--level", "full")
    for name in json.loads(run("qemu-img", "info", "--output=json", image))["format-specific"][
        "data"
    ]["bitmaps"]:
        run("qemu-img", "bitmap", "--remove", image, name["name"])
    qemu_io(image, "write -P 0x21 1M 4k")
    out = ok("backup", "image", image, "--store", store)
    assert "is missing: full read" in out
    snap = snapshots(store)[-1]
    assert "missing" in snap["disks"][0]["attributes"]["fallback"]
    assert snap["disks"][0]["attributes"]["read"] == "full"
    target = tmp_path / "r.qcow2"
    ok("restore", snap["id"], "--store", store, "--to", target)
    assert identical(image, target)


def test_clones_store_only_differing_chunks(tmp_path: Path, store: Path) -> None:
    template = make_fs_qcow2(tmp_path, "template")
    a, b = tmp_path / "clone-a.qcow2", tmp_path / "clone-b.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", template, a)
    run("qemu-img", "convert", "-O", "qcow2", template, b)
    # 4 slots with distinct new content (a 256 KiB slot filled with one pattern dedups with
    # any other slot of that pattern, so each gets its own)
    qemu_io(
        b,
        "write -P 0x99 12M 64k",
        "write -P 0x98 50M 256k",
        "write -P 0x97 51M 256k",
        "write -P 0x96 52M 256k",
    )
    ok("backup", "image", a, "--store", store)
    with Store.open(store, passphrase=b"test-pass", writable=False) as s:
        after_a = s.index.stats().chunks
    out = ok("backup", "image", b, "--store", store)
    assert "new chunks 4," in out
    with Store.open(store, passphrase=b"test-pass", writable=False) as s:
        assert s.index.stats().chunks - after_a == 4


def test_raw_image_is_always_read_fully(tmp_path: Path, store: Path) -> None:
    raw = tmp_path / "disk.raw"
    run("qemu-img", "convert", "-O", "raw", make_fs_qcow2(tmp_path, "vm"), raw)
    ok("backup", "image", raw, "--store", store)
    out = ok("backup", "image", raw, "--store", store)
    assert "raw image has no dirty bitmaps: full read" in out
    target = tmp_path / "r.raw"
    ok("restore", snapshots(store)[-1]["id"], "--store", store, "--to", target)
    assert target.read_bytes() == raw.read_bytes()


async def test_a_raw_image_is_read_directly_a_qcow2_one_through_qemu_nbd(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    boot = make_fs_qcow2(tmp_path, "boot", size_mib=32, seed=3)
    data = tmp_path / "data.raw"
    run("qemu-img", "convert", "-O", "raw", make_fs_qcow2(tmp_path, "d", seed=4), data)
    store = make_store(chunk_size=256 * 1024, pack_size=8 * 2**20)
    served: list[set[Path]] = []  # at each slot done: the images an NBD server names

    def look(name: str) -> None:
        if name == "pipeline.slot.done" and len(served) < 1000:
            served.append({p for p in (boot, data) if nbd_servers_of([p])})

    pool = ThreadCpuPool(store.keys, store.config.chunk_size, workers=2)
    failpoints.install(look)
    try:
        outcome = await run_backup(
            store=store,
            pool=pool,
            source=LocalImageSource([boot, data]),
            journal=Journal(store.path / "journal"),
            level="full",
        )
    finally:
        failpoints.install(None)
        await pool.aclose()
    assert outcome.record.state is State.SUCCEEDED, outcome.record.error
    assert served, "no slot was processed"
    assert all(images == {boot} for images in served), served  # the qcow2 one only
    assert len(outcome.record.resources["exports"]) == 1
    assert outcome.manifest is not None
    assert read_disk(store, outcome.manifest, 1) == data.read_bytes()
    assert nbd_servers_of([boot, data]) == []


def test_bad_input_is_named(tmp_path: Path, store: Path) -> None:
    proc = tessera("backup", "image", tmp_path / "nope.qcow2", "--store", store)
    assert proc.returncode == 2 and "nope.qcow2 does not exist" in proc.stderr
    proc = tessera("restore", "ffff", "--store", store, "--to", tmp_path / "x.qcow2")
    assert proc.returncode == 1 and "snapshot ffff: no such snapshot" in proc.stderr
    image = make_fs_qcow2(tmp_path, "vm")
    ok("backup", "image", image, "--store", store)
    sid = snapshots(store)[0]["id"]
    proc = tessera("restore", sid, "--store", store, "--to", image)  # exists: never overwritten
    assert proc.returncode == 1 and str(image) in proc.stdout + proc.stderr
    proc = tessera("restore", sid, "--store", store, "--disk", "sdz", "--to", tmp_path / "y.qcow2")
    assert proc.returncode == 1 and "no disk 'sdz'" in proc.stderr


def test_multi_disk_vm_restores_into_a_directory(tmp_path: Path, store: Path) -> None:
    boot = make_fs_qcow2(tmp_path, "boot", size_mib=32, seed=3)
    data = tmp_path / "data.raw"
    run("qemu-img", "convert", "-O", "raw", make_fs_qcow2(tmp_path, "d", seed=4), data)
    out = ok("backup", "image", boot, data, "--store", store, "--vm", "db-server")
    assert "vm db-server" in out
    snap = snapshots(store)[0]
    assert snap["vm"]["name"] == "db-server"
    assert [d["name"] for d in snap["disks"]] == ["boot.qcow2", "data.raw"]
    out_dir = tmp_path / "restored"
    out_dir.mkdir()
    ok("restore", snap["id"], "--store", store, "--to", out_dir)
    assert identical(boot, out_dir / "boot.qcow2")
    assert (out_dir / "data.raw").read_bytes() == data.read_bytes()
    ok("restore", snap["id"], "--store", store, "--disk", "data.raw", "--to", tmp_path / "only.raw")
    assert (tmp_path / "only.raw").read_bytes() == data.read_bytes()
