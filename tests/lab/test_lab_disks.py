"""Lab disks: real ext4 filesystems, deterministic, template clones differing a little."""

import json
import subprocess
from pathlib import Path

from plugins.lab.disks import DiskRequest, build_disks, generate_files

GiB = 2**30


def qemu_info(path: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", path], capture_output=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def raw_bytes(image: Path, dest: Path) -> bytes:
    """The filesystem part (first 128 MiB) of an image."""
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, dest], check=True)
    with dest.open("rb") as f:
        return f.read(128 * 2**20)


async def test_template_clones_and_data_disks(tmp_path: Path) -> None:
    requests = [
        DiskRequest("web01_os", tmp_path / "a.qcow2", "qcow2", 10 * GiB, template=True, vm="web01"),
        DiskRequest("web02_os", tmp_path / "b.qcow2", "qcow2", 10 * GiB, template=True, vm="web02"),
        DiskRequest("db01_data", tmp_path / "c.raw", "raw", GiB),
    ]
    images = await build_disks(requests, tmp_path / "work")
    assert [i.path for i in images] == [r.path for r in requests]
    assert qemu_info(images[0].path)["virtual-size"] == 10 * GiB
    assert qemu_info(images[0].path)["format"] == "qcow2"
    assert images[2].path.stat().st_size == GiB
    # Real filesystems: e2fsck finds them clean.
    a = raw_bytes(images[0].path, tmp_path / "a.raw")
    b = raw_bytes(images[1].path, tmp_path / "b.raw")
    (tmp_path / "fs.raw").write_bytes(a)
    subprocess.run(["e2fsck", "-fn", tmp_path / "fs.raw"], check=True, capture_output=True)
    # Clones of one template differ in a few MiB-sized slots only.
    mib = 2**20
    differing = sum(a[i : i + mib] != b[i : i + mib] for i in range(0, len(a), mib))
    assert 0 < differing <= 8


def test_same_names_same_files(tmp_path: Path) -> None:
    def tree(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}

    generate_files(tmp_path / "a", "disk-x", 4 * 2**20)
    generate_files(tmp_path / "b", "disk-x", 4 * 2**20)
    generate_files(tmp_path / "c", "disk-y", 4 * 2**20)
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert tree(tmp_path / "a") != tree(tmp_path / "c")
