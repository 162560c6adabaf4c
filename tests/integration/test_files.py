"""``tessera files`` and ``tessera mount``: files out of a backup without restoring the VM.

A disk image made by libguestfs (the real tools, not ours: the lab's guest layout,
``plugins.lab.guest_disk``, built once per session: ``tests.guest_disks``) with an MBR
partition table and the filesystems an admin's VMs hold: ext4, XFS, NTFS, and an ext4 volume
of an LVM volume group, each with files of random bytes larger than a chunk, a symlink,
nested directories.
It is backed up with the CLI; then through the appliance: ``files ls`` names every filesystem
with its type and lists directories; ``files get`` brings files and whole directories back
byte for byte; ``files find`` matches names; ``mount`` shows the same tree through FUSE,
read-only, until SIGINT; the store verifies clean afterwards. An appliance that does not come
up in time is killed and reported, leaving no process behind.

The appliance runs emulated here (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``): this machine's
KVM is nested and does not boot a Linux guest (it hangs right after decompressing the kernel);
on a DataMover with KVM the same commands take seconds instead of tens of seconds.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.ids import ChunkId, short
from engine.restore.files import ApplianceError, GuestTree
from engine.store.chunk_store import Store
from engine.store.pack import pack_path
from engine.workers import make_cpu_pool
from plugins.lab.guest_disk import guest_files
from tests.cli import Cli
from tests.guest_disks import NAME, guest_disk_copy
from tests.helpers import wait_created

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "test-pass"
ENV = {
    **os.environ,
    "TESSERA_PASSPHRASE": PASSPHRASE,
    "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
}
CLI = Cli(passphrase=PASSPHRASE, env={"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}, timeout=600)
tessera, ok = CLI.run, CLI.ok


class Lab:
    def __init__(self, store: Path, snapshot: str, files: dict[str, bytes]) -> None:
        self.store = store
        self.snapshot = snapshot
        self.files = files  # tree path → content


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    tmp = tmp_path_factory.mktemp("files")
    image = guest_disk_copy(tmp_path_factory, tmp / "files-vm.raw")
    files = guest_files(NAME)
    store = tmp / "store"
    ok("store", "init", store)
    ok("backup", "image", image, "--store", store, "--vm", "files-vm", "--level", "full")
    snapshot = ok("snapshots", "--store", store).splitlines()[1].split()[0]
    image.unlink()  # the backup is all there is
    return Lab(store, snapshot, files)


def test_ls_names_every_filesystem_lists_directories_and_names_a_missing_path(lab: Lab) -> None:
    # several paths at once, each under its heading (one appliance for all); the last is not
    # there: what came before it is listed, then the command fails naming it
    paths = ["/", "/sda1/data", "/sda1/etc", "/sda1/nope"]
    proc = tessera("files", "ls", lab.snapshot, "--store", lab.store, *paths)
    assert proc.returncode != 0
    assert "/sda1/nope" in proc.stderr and "No such file" in proc.stderr, proc.stderr
    out = proc.stdout
    sections = {s.split("\n")[0]: s.split("\n")[1:] for s in out.strip().split("\n\n")}
    assert list(sections) == ["/:", "/sda1/data:", "/sda1/etc:", "/sda1/nope:"], out
    assert sections["/sda1/nope:"] == [], out
    table = {line.split()[0]: line.split()[1:] for line in sections["/:"]}
    assert table == {
        "sda1": ["ext4", "/dev/sda1", "files-vm.raw"],
        "sda2": ["xfs", "/dev/sda2", "files-vm.raw"],
        "sda3": ["ntfs", "/dev/sda3", "files-vm.raw"],
        "vg0-lv0": ["ext4", "/dev/vg0/lv0", "files-vm.raw"],
    }, out
    (line,) = sections["/sda1/data:"]
    mode, size, _day, _time, name = line.split()
    expected = len(lab.files["/sda1/data/random.bin"])
    assert (mode[0], int(size), name) == ("-", expected, "random.bin"), out
    names = {line.split()[4]: line.split()[5:] for line in sections["/sda1/etc:"]}
    assert names == {"hostname": [], "name-link": ["->", "hostname"]}, out


def test_get_brings_files_and_directories_back_byte_for_byte(lab: Lab, tmp_path: Path) -> None:
    out = ok(
        "files",
        "get",
        lab.snapshot,
        "--store",
        lab.store,
        "/sda1/data/random.bin",
        "/sda1/etc",
        "/sda2/srv/www",
        "/sda3/Users/doc.txt",
        "/vg0-lv0/var/log/app.log",
        "--to",
        tmp_path,
    )
    assert "copied 6 files" in out, out
    files = lab.files
    assert (tmp_path / "random.bin").read_bytes() == files["/sda1/data/random.bin"]
    assert (tmp_path / "etc" / "hostname").read_bytes() == files["/sda1/etc/hostname"]
    assert os.readlink(tmp_path / "etc" / "name-link") == "hostname"
    assert (tmp_path / "www" / "big.bin").read_bytes() == files["/sda2/srv/www/big.bin"]
    assert (tmp_path / "www" / "index.html").read_bytes() == files["/sda2/srv/www/index.html"]
    assert (tmp_path / "doc.txt").read_bytes() == files["/sda3/Users/doc.txt"]
    assert (tmp_path / "app.log").read_bytes() == files["/vg0-lv0/var/log/app.log"]
    # reading wrote nothing into the store
    verify = tessera("store", "verify", lab.store)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_find_matches_names(lab: Lab) -> None:
    out = ok("files", "find", lab.snapshot, "--store", lab.store, "/sda2", "--name", "*.bin")
    assert out.splitlines() == ["/sda2/srv/www/big.bin"], out


def test_mount_shows_the_tree_read_only_until_sigint(lab: Lab, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli.main", "mount", lab.snapshot, mnt, "--store", lab.store],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background job's children ignore SIGINT: this one must take it like a terminal's
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the mount is there
        assert line.startswith(f"mounted snapshot {lab.snapshot}"), line + proc.stderr.read()
        assert sorted(os.listdir(mnt)) == ["sda1", "sda2", "sda3", "vg0-lv0"]
        for path, data in lab.files.items():
            assert (mnt / path.lstrip("/")).read_bytes() == data, path
        with pytest.raises(OSError) as refused:
            (mnt / "sda1" / "etc" / "new").write_bytes(b"x")
        assert refused.value.errno in (30, 1, 13), refused.value  # EROFS (or EPERM, EACCES)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount", "-u", str(mnt)], check=False, capture_output=True)
    assert proc.returncode == 0, out + err
    assert f"unmounted {mnt}" in out, out
    assert not os.path.ismount(mnt)


def test_an_appliance_that_does_not_start_in_time_is_killed_and_named(
    lab: Lab, tmp_path: Path
) -> None:
    # Its own TMPDIR marks this command's qemu (its NBD sockets live there); other tests may
    # run appliances at the same time. The appliance cache stays where every test shares it.
    env = {**ENV, "TMPDIR": str(tmp_path), "LIBGUESTFS_CACHEDIR": "/var/tmp"}
    argv = ["files", "ls", lab.snapshot, "/", "--store", str(lab.store), "--launch-timeout", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode != 0
    assert f"snapshot {lab.snapshot}: the appliance did not start within 1 s" in proc.stderr, (
        proc.stderr
    )
    assert not _qemus(str(tmp_path)), "the appliance's qemu was left running"


def test_faults_while_copying_out_are_named_and_leave_no_partial_file(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One appliance, three faults: a full destination (ENOSPC), a damaged chunk in the
    store under a file (the appliance sees EIO; the error names the chunk), and the helper
    killed in the middle of a copy (its qemu does not outlive it)."""
    store = tmp_path / "store"
    shutil.copytree(lab.store, store)  # the damage stays out of the module's store
    big = lab.files["/sda2/srv/www/big.bin"]
    damaged = _damage_a_chunk_inside(store, lab.snapshot, big)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tessera-test", full], check=True)
    monkeypatch.setenv("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    try:
        asyncio.run(_three_faults(store, lab, full, tmp_path / "out", damaged))
    finally:
        subprocess.run(["umount", full], check=True)


async def _three_faults(store_path: Path, lab: Lab, full: Path, out: Path, damaged: str) -> None:
    with Store.open(store_path, passphrase=PASSPHRASE.encode(), writable=False) as store:
        manifest = store.manifest(lab.snapshot)
        pool = make_cpu_pool(store.keys, manifest.chunk_size)
        try:
            async with GuestTree.open(store, pool, manifest, manifest.disks) as tree:
                # 1. a full destination: named, and nothing half-written left there
                with pytest.raises(ApplianceError) as e:
                    await tree.get("/sda1/data/random.bin", full)
                text = str(e.value)
                assert "copying /sda1/data/random.bin to" in text, text
                assert "No space left on device" in text and "nothing of it kept" in text, text
                assert os.listdir(full) == [], os.listdir(full)
                # 2. a damaged chunk under a file: the file is named, and the chunk
                out.mkdir()
                with pytest.raises(ApplianceError) as e:
                    await tree.get("/sda2/srv/www", out)
                text = str(e.value)
                assert "copying /sda2/srv/www/big.bin" in text, text
                assert f"corrupt record for chunk {damaged}" in text, text
                assert not (out / "www" / "big.bin").exists()
                assert not list(out.rglob("*.partial")), list(out.rglob("*"))
                # the rest of the tree still reads
                assert [x.name for x in await tree.ls("/sda1/etc")] == ["hostname", "name-link"]
                # 3. the helper killed mid-copy: the request fails naming it, and its qemu
                # is ended with the tree though it was no longer the helper's child
                qemu = tree.qemu
                assert qemu is not None and qemu in _qemus("")
                (out / "data").mkdir()
                started = asyncio.create_task(
                    asyncio.to_thread(wait_created, out / "data", ".partial", 120)
                )
                copy = asyncio.create_task(tree.get("/sda1/data", out))
                assert await started, "the copy never started"  # its .partial is there
                os.kill(tree._helper.pid, signal.SIGKILL)
                with pytest.raises(ApplianceError) as e:
                    await copy
                assert "the appliance helper ended (exit status -9) during get" in str(e.value)
            assert qemu not in _qemus(""), "the appliance's qemu outlived its killed helper"
        finally:
            await pool.aclose()


def _damage_a_chunk_inside(store_path: Path, snapshot: str, data: bytes) -> str:
    """Flip a byte in the record of a chunk that holds only bytes of ``data`` (a file's
    content); the chunk's short id."""
    with Store.open(store_path, passphrase=PASSPHRASE.encode(), writable=False) as store:
        manifest = store.manifest(snapshot)
        with store.open_diskmap(manifest, manifest.disks[0]) as dm:
            ids = [cid for _, cid in dm.iter_ids() if any(cid)]
        cid = next(c for c in ids if store.read_chunk(ChunkId(c)) in data)
        location = store.index.lookup(cid)
        assert location is not None
    with pack_path(store_path / "packs", location.pack).open("r+b") as f:
        f.seek(location.offset + 100)
        byte = f.read(1)
        f.seek(location.offset + 100)
        f.write(bytes([byte[0] ^ 0x40]))
    return short(ChunkId(cid))


def _qemus(marker: str) -> set[int]:
    """Running qemu processes whose command line holds ``marker`` (a killed one may stay a
    zombie a while: not running)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            running = stat.rsplit(")", 1)[1].split()[0] != "Z"
            if comm.startswith("qemu-system") and running and marker in cmdline:
                found.add(int(entry.name))
    return found
