"""``tessera files`` and ``tessera mount``: files out of a backup without restoring the VM.

A disk image made by libguestfs (the real tools, not ours) with an MBR partition table and
the filesystems an admin's VMs hold: ext4, XFS, NTFS, and an ext4 volume of an LVM volume
group, each with files of random bytes larger than a chunk, a symlink, nested directories.
It is backed up with the CLI; then through the appliance: ``files ls`` names every filesystem
with its type and lists directories; ``files get`` brings files and whole directories back
byte for byte; ``files find`` matches names; ``mount`` shows the same tree through FUSE,
read-only, until SIGINT; the store verifies clean afterwards. An appliance that does not come
up in time is killed and reported, leaving no process behind.

The appliance runs emulated here (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``): this machine's
KVM is nested and does not boot a Linux guest (it hangs right after decompressing the kernel);
on a DataMover with KVM the same commands take seconds instead of tens of seconds.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest_images import lab_files, make_disk

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "test-pass"
ENV = {
    **os.environ,
    "TESSERA_PASSPHRASE": PASSPHRASE,
    "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg",
}


def tessera(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
    )


def ok(*args: str | Path) -> str:
    proc = tessera(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


class Lab:
    def __init__(self, store: Path, snapshot: str, files: dict[str, bytes]) -> None:
        self.store = store
        self.snapshot = snapshot
        self.files = files  # tree path → content


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    tmp = tmp_path_factory.mktemp("files")
    files = lab_files()
    image = tmp / "files-vm.raw"
    make_disk(image, files, tmp)
    store = tmp / "store"
    ok("store", "init", store)
    ok("backup", "image", image, "--store", store, "--vm", "files-vm", "--level", "full")
    snapshot = ok("snapshots", "--store", store).splitlines()[1].split()[0]
    image.unlink()  # the backup is all there is
    return Lab(store, snapshot, files)


def test_ls_names_every_filesystem_and_lists_directories(lab: Lab) -> None:
    out = ok("files", "ls", lab.snapshot, "--store", lab.store, "/")
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert table == {
        "sda1": ["ext4", "/dev/sda1", "files-vm.raw"],
        "sda2": ["xfs", "/dev/sda2", "files-vm.raw"],
        "sda3": ["ntfs", "/dev/sda3", "files-vm.raw"],
        "vg0-lv0": ["ext4", "/dev/vg0/lv0", "files-vm.raw"],
    }, out
    # several paths at once, each under its heading (one appliance for all)
    out = ok("files", "ls", lab.snapshot, "--store", lab.store, "/sda1/data", "/sda1/etc")
    sections = {s.split("\n")[0]: s.split("\n")[1:] for s in out.strip().split("\n\n")}
    assert list(sections) == ["/sda1/data:", "/sda1/etc:"], out
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


def test_find_matches_names_and_a_missing_path_is_named(lab: Lab) -> None:
    out = ok("files", "find", lab.snapshot, "--store", lab.store, "/sda2", "--name", "*.bin")
    assert out.splitlines() == ["/sda2/srv/www/big.bin"], out
    missing = tessera("files", "ls", lab.snapshot, "--store", lab.store, "/sda1/nope")
    assert missing.returncode != 0
    assert "/sda1/nope" in missing.stderr and "No such file" in missing.stderr, missing.stderr


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


def test_an_appliance_that_does_not_start_in_time_is_killed_and_named(lab: Lab) -> None:
    before = _qemus()
    proc = tessera("files", "ls", lab.snapshot, "--store", lab.store, "/", "--launch-timeout", "1")
    assert proc.returncode != 0
    assert f"snapshot {lab.snapshot}: the appliance did not start within 1 s" in proc.stderr, (
        proc.stderr
    )
    assert _qemus() <= before, "the appliance's qemu was left running"


def _qemus() -> set[int]:
    """Running qemu processes (a killed one may stay a zombie a while: not running)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if comm.startswith("qemu-system") and stat.rsplit(")", 1)[1].split()[0] != "Z":
                found.add(int(entry.name))
    return found
