"""The ``ovirt-engine-sdk-python`` examples, run unchanged against the lab (``conftest``).

Each test runs real client programs nobody here wrote and checks what they print or the
images they leave with ``qemu-img compare`` against the lab's own image files. VMs are split
so the tests do not meet: ``db01`` is backed up, ``myvm`` snapshotted, ``web02`` (down)
downloaded; uploads make new floating disks.
"""

import json
import re
import subprocess
import uuid
from pathlib import Path

import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from tests.conformance.conftest import Examples
from tests.lab.polling import polls

pytestmark = pytest.mark.integration


def compare(a: str | Path, b: str | Path) -> None:
    """``qemu-img compare`` (guest-visible content, any formats); fails with its words."""
    proc = subprocess.run(
        ["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{a} != {b}: {proc.stdout}{proc.stderr}"


def write(image: str, fmt: str, pattern: int, offset: str, length: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", image],
        check=True,
        capture_output=True,
    )


def wait_snapshots_ok(examples: Examples, vm_name: str) -> None:
    """Poll the VM's snapshots until none is locked (the lab process runs on the real clock:
    a new snapshot is ``ok`` one phase step after it was made, whoever polls)."""
    engine = examples.lab["engine"]
    conn = sdk.Connection(
        url=engine["url"], username=engine["username"],
        password=Path(engine["password_file"]).read_text().strip(), ca_file=engine["ca_file"],
    )  # fmt: skip
    try:
        vm_service = conn.system_service().vms_service().vm_service(examples.vm(vm_name)["id"])
        for _ in polls():
            snaps = vm_service.snapshots_service()
            states = [snaps.snapshot_service(s.id).get().snapshot_status for s in snaps.list()]
            if types.SnapshotStatus.LOCKED not in states:
                return
        raise AssertionError(f"snapshots of {vm_name} stay locked")
    finally:
        conn.close()


def test_inventory_examples(examples: Examples) -> None:
    names = [v["name"] for v in examples.lab["vms"]]
    assert examples.run("page_vms.py").split() == names  # one VM per page, in engine order
    out = examples.run("follow_vm_links.py")
    assert "cluster: Default" in out and "template: Blank" in out and "role: " in out
    out = examples.run("asynchronous_inventory.py")
    assert f"Loaded {len(names)} VMs." in out and "Loaded 1 networks." in out
    assert "Loaded NICs of VM 'myvm'." in out and "Loaded VM reported devices." in out
    assert "myvm:Active VM:myvm_os:data1" in examples.run("list_vm_snapshots.py")


def test_backup_vm_full_then_incremental(examples: Examples, tmp_path: Path) -> None:
    vm = examples.vm("db01")
    # the engine leaves direct LUN and shareable disks out of backups (and snapshots)
    disks = {d["id"]: d for d in vm["disks"] if d["storage_type"] == "image" and not d["shareable"]}
    examples.run("backup_vm.py", "-c", "lab", "full", "--backup-dir", tmp_path, vm["id"])
    fulls = sorted(tmp_path.glob("*.full.qcow2"))
    assert len(fulls) == len(disks)
    for f in fulls:
        compare(f, disks[f.name.split(".")[2]]["path"])
    checkpoint = fulls[0].name.split(".")[1]

    for i, d in enumerate(disks.values()):  # the guest writes between the backups
        write(d["path"], d["format"], 0xC0 + i, "1M", "192k")
    examples.run(
        "backup_vm.py", "-c", "lab", "incremental", "--backup-dir", tmp_path,
        "--from-checkpoint-uuid", checkpoint, vm["id"],
    )  # fmt: skip
    incs = sorted(tmp_path.glob("*.incremental.qcow2"))
    assert len(incs) == len(disks)
    for f in incs:
        compare(f, disks[f.name.split(".")[2]]["path"])  # through its backing full backup

    listed = examples.run("checkpoints.py", "-c", "lab", "list", vm["id"])
    assert checkpoint in listed
    examples.run("checkpoints.py", "-c", "lab", "remove", vm["id"], checkpoint)
    assert checkpoint not in examples.run("checkpoints.py", "-c", "lab", "list", vm["id"])


def test_download_disk(examples: Examples, tmp_path: Path) -> None:
    (disk,) = examples.vm("web02")["disks"]
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"web02.{fmt}"
        examples.run("download_disk.py", "-c", "lab", "-f", fmt, disk["id"], out)
        compare(out, disk["path"])


def test_upload_disk(examples: Examples, tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(source), "64M"], check=True)
    write(str(source), "qcow2", 0xAB, "0", "1M")
    write(str(source), "qcow2", 0xCD, "40M", "3M")
    for fmt in ("qcow2", "raw"):
        disk_id = str(uuid.uuid4())
        examples.run(
            "upload_disk.py", "-c", "lab", "--sd-name", "data1", "--disk-format", fmt,
            "--disk-sparse", "--disk-id", disk_id, source,
        )  # fmt: skip
        made = Path(examples.lab["engine"]["ca_file"]).parent / "images" / f"{disk_id}.{fmt}"
        compare(source, made)


def test_snapshot_examples(examples: Examples, tmp_path: Path) -> None:
    """add_vm_snapshot.py on myvm; its disk's snapshots per disk and per storage domain;
    download_disk_snapshot.py of the snapshot volume."""
    (disk,) = examples.vm("myvm")["disks"]
    write(disk["path"], "qcow2", 0x5A, "0", "256k")
    examples.run("add_vm_snapshot.py")
    wait_snapshots_ok(examples, "myvm")  # the example does not wait; a real engine takes seconds
    assert "myvm:My snapshot:myvm_os:data1" in examples.run("list_vm_snapshots.py")
    chain = json.loads(examples.run("list_disk_snapshots.py", "-c", "lab", disk["id"]))
    assert len(chain) == 2 and chain[0]["parent"] is None
    assert chain[1]["parent"] == chain[0]["id"]
    volume = chain[0]["id"]
    out = tmp_path / "snapshot.qcow2"
    examples.run("download_disk_snapshot.py", "-c", "lab", "data1", volume, out)
    (volume_file,) = Path(disk["path"]).parent.glob(Path(disk["path"]).name + ".*")
    compare(out, volume_file)  # the renamed top file (``engine.snapshots``)
    compare(out, disk["path"])  # nothing written since: the VM still sees the same


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_ovirt_img(examples: Examples, tmp_path: Path, fmt: str) -> None:
    engine = examples.lab["engine"]
    common = [
        "--engine-url", engine["url"].removesuffix("/ovirt-engine/api"),
        "--username", engine["username"], "--password-file", engine["password_file"],
        "--cafile", engine["ca_file"],
    ]  # fmt: skip

    def ovirt_img(*args: str | Path) -> str:
        proc = subprocess.run(
            ["ovirt-img", *map(str, args)], env=examples.env, capture_output=True, text=True,
            timeout=180, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"ovirt-img {args}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    source = tmp_path / f"source.{fmt}"
    subprocess.run(["qemu-img", "create", "-f", fmt, str(source), "32M"], check=True)
    write(str(source), fmt, 0x11, "2M", "1M")
    disk_id = str(uuid.uuid4())
    ovirt_img("upload-disk", *common, "-s", "data1", "-f", fmt, "--disk-id", disk_id, source)
    made = Path(engine["ca_file"]).parent / "images" / f"{disk_id}.{fmt}"
    compare(source, made)
    back = tmp_path / f"back.{fmt}"
    ovirt_img("download-disk", *common, "-f", fmt, disk_id, back)
    compare(source, back)
    assert re.fullmatch(r"[0-9a-f-]{36}", disk_id)
