"""``tessera store verify`` / ``store repair`` / ``snapshots`` through the CLI on real
backups: a corrupted chunk marks its snapshot damaged, the next backup of the same image
heals it and the restore is identical; a verify killed with SIGKILL resumes; verify runs
while another process holds the writer lock; repair quarantines an unreadable pack."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.ids import short
from engine.store.chunk_store import Store
from engine.store.pack import pack_path
from tests.cli import Cli
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.helpers import realistic_bytes, write_snapshot
from tests.integration.images import identical, make_fs_qcow2, reference

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {"TESSERA_PASSPHRASE": PASSPHRASE.decode()}
CLI = Cli(passphrase=PASSPHRASE.decode())
tessera = CLI.run
ok = CLI.ok

CHUNK = 256 * 1024


def integrity(*args: str | Path) -> str:
    proc = tessera(*args)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    return proc.stdout


def new_store(path: Path) -> Path:
    Store.init(
        path, chunk_size=CHUNK, pack_size=2 * 1024 * 1024, passphrase=PASSPHRASE, kdf=CHEAP_KDF
    )
    return path


def flip_record(store: Path, snapshot: str, slot: int) -> tuple[bytes, str]:
    """Flip one byte inside the record of a data slot of ``snapshot``; (chunk id, pack)."""
    with Store.open(store, passphrase=PASSPHRASE, writable=False) as s:
        m = s.manifest(snapshot)
        with s.open_diskmap(m, m.disks[0]) as dm:
            cid = next(c for n, c in dm.iter_ids() if n >= slot and any(c))
        loc = s.index.lookup(cid)
        assert loc is not None
    path = pack_path(store / "packs", loc.pack)
    with path.open("r+b") as f:
        f.seek(loc.offset + 100)
        b = f.read(1)
        f.seek(loc.offset + 100)
        f.write(bytes([b[0] ^ 0x40]))
    return cid, loc.pack


def snapshots(store: Path) -> list[dict[str, object]]:
    docs: list[dict[str, object]] = json.loads(ok("snapshots", "--store", store, "--json"))
    return docs


def test_damaged_snapshot_healed_by_the_next_incremental(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    image = make_fs_qcow2(tmp_path, "vm1", size_mib=32, seed=4)
    ref = reference(image, tmp_path / "ref.raw")
    ok("backup", "image", image, "--store", store)
    (first,) = snapshots(store)
    sid = str(first["id"])
    cid, pack = flip_record(store, sid, slot=10)

    out = integrity("store", "verify", store, "--data")
    assert f"bad-chunk: corrupt record for chunk {short(cid)} in pack {pack}" in out
    assert f"snapshots: {sid}; VMs: vm1" in out and f"damaged snapshots: {sid}" in out
    (listed,) = snapshots(store)
    damaged = listed["damaged"]
    assert isinstance(damaged, dict) and damaged["chunks"][0]["id"] == cid.hex()
    table = ok("snapshots", "--store", store)
    assert "DAMAGED" in table.splitlines()[0] and "yes (1 chunks)" in table
    # a restore of the damaged snapshot fails naming the chunk (never wrong bytes)
    proc = tessera("restore", sid[:8], "--store", store, "--to", tmp_path / "bad.qcow2")
    assert proc.returncode != 0 and short(cid) in proc.stdout + proc.stderr

    # an incremental (nothing changed in the guest) reads the slot holding the bad chunk
    # again instead of reusing the parent's id: a good copy is stored and the chunk heals
    out = ok("backup", "image", image, "--store", store, "--level", "incremental")
    assert "level incremental" in out and "new chunks 1," in out, out
    assert all(s["damaged"] is None for s in snapshots(store))
    assert "DAMAGED" in ok("snapshots", "--store", store) and "yes (" not in ok(
        "snapshots", "--store", store
    )
    doc = json.loads(ok("store", "verify", store, "--data", "--json"))
    assert doc["ok"] and doc["damaged"] == []
    target = tmp_path / "restored.qcow2"
    ok("restore", sid[:8], "--store", store, "--to", target)
    assert identical(target, ref)


def store_of_many_packs(path: Path) -> list[str]:
    new_store(path)
    with Store.open(path, passphrase=PASSPHRASE) as s:
        disk = realistic_bytes(4 * CHUNK, seed=1) + os.urandom(40 * CHUNK)
        write_snapshot(s, "vm-many", {"d": disk})
        return [p.name for p in s.index.packs()]


KILLER = """
import sys
from engine.cli.main import main
from engine.util import failpoints
from tests.helpers import sigkill_at
failpoints.install(sigkill_at("verify.pack.done", int(sys.argv[2])))
sys.exit(main(["store", "verify", sys.argv[1], "--data", "--json"]))
"""


def test_killed_verify_resumes(tmp_path: Path) -> None:
    packs = store_of_many_packs(tmp_path / "store")
    assert len(packs) >= 5
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "store"), "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    doc = json.loads(ok("store", "verify", tmp_path / "store", "--data", "--json"))
    assert doc["ok"] and doc["resumed"]
    assert doc["packs_checked"] == len(packs) - 3 and doc["packs_in_run"] == len(packs)
    doc = json.loads(ok("store", "verify", tmp_path / "store", "--percent", "50", "--json"))
    assert not doc["resumed"] and doc["packs_checked"] == -(-len(packs) // 2)


def test_verify_beside_a_writer(tmp_path: Path) -> None:
    """A process holds the writer lock; verify (another process) marks a bad chunk, the
    writer's has() sees it, and its next put heals it."""
    path = new_store(tmp_path / "store")
    data = realistic_bytes(8 * CHUNK, seed=2)
    with Store.open(path, passphrase=PASSPHRASE) as writer:
        m = write_snapshot(writer, "vm-w", {"d": data})
        cid, _ = flip_record(path, m.snapshot_id, slot=0)
        out = integrity("store", "verify", path, "--data")
        assert "damaged snapshots" in out
        assert not writer.has(cid)
        write_snapshot(writer, "vm-w", {"d": data})
        assert writer.has(cid) and not writer.index.bad_chunks()
        assert not (path / "snapshots" / m.snapshot_id / "damaged").exists()
    ok("store", "verify", path, "--data")


def test_repair_quarantines_and_lists_lost(tmp_path: Path) -> None:
    path = new_store(tmp_path / "store")
    with Store.open(path, passphrase=PASSPHRASE) as s:
        keep = write_snapshot(s, "vm-keep", {"d": realistic_bytes(4 * CHUNK, seed=7)})
        lose = write_snapshot(s, "vm-lose", {"d": os.urandom(4 * CHUNK)})
        with s.open_diskmap(lose, lose.disks[0]) as dm:
            loc = s.index.lookup(dm.get(0))
        assert loc is not None
        with s.open_diskmap(keep, keep.disks[0]) as dm:
            keep_locs = [s.index.lookup(c) for _, c in dm.iter_ids()]
        keep_packs = {kl.pack for kl in keep_locs if kl is not None}
    assert loc.pack not in keep_packs
    pack = pack_path(path / "packs", loc.pack)
    size = pack.stat().st_size
    with pack.open("r+b") as f:  # no record and no trailer survive: nothing to scan
        f.seek(24)
        f.write(bytes(size - 24))
    out = integrity("store", "repair", path)
    assert f"quarantined pack {loc.pack}" in out
    assert (
        f"lost: 1 snapshots have missing or damaged data: {lose.snapshot_id} (VMs: vm-lose)" in out
    )
    assert (path / "quarantine" / pack.name).exists() and not pack.exists()
    note = json.loads((path / "quarantine" / f"{loc.pack}.json").read_text())
    assert note["pack"] == loc.pack
    by_id = {s["id"]: s for s in snapshots(path)}
    assert by_id[keep.snapshot_id]["damaged"] is None
    assert by_id[lose.snapshot_id]["damaged"] is not None
    doc = json.loads(integrity("store", "repair", path, "--json"))  # still lost, nothing new
    assert doc["quarantined"] == [] and doc["damaged"] == [lose.snapshot_id]
