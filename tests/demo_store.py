"""``make demo`` until the lab demo lands: the disk-image tour of Tessera.

Creates an encrypted store, backs up a qcow2 holding an ext4 filesystem of real files (full),
changes it with qemu-io, backs it up again (incremental: only changed slots are read), backs
up a clone of the image (dedup: only its differing chunks are stored), restores the
incremental snapshot and checks it with ``qemu-img compare``, then shows the snapshots, the
store's dedup/compression figures and a full verify. Everything lives in a temporary
directory that is removed at the end.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.bench.data import fs_image


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tessera(*args: str | Path) -> str:
    print("$ tessera " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    print(proc.stdout, end="", flush=True)
    return proc.stdout


def sh(*argv: str | Path) -> None:
    print("$ " + " ".join(map(str, argv)), flush=True)
    subprocess.run(list(map(str, argv)), check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    os.environ.setdefault("TESSERA_PASSPHRASE", "demo passphrase")
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        work = Path(tmp)
        store, vm, clone = work / "store", work / "vm1.qcow2", work / "vm2.qcow2"
        step("a VM disk: ext4 with real files, as qcow2")
        sh("qemu-img", "convert", "-O", "qcow2", fs_image(256), vm)
        step("an encrypted store (passphrase from $TESSERA_PASSPHRASE)")
        tessera("store", "init", store)
        step("first backup: full")
        tessera("backup", "image", vm, "--store", store)
        step("the guest writes: scattered 4 KiB blocks, a 3 MiB file, a discard")
        sh(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 5M 4k",
            "-c",
            "write -P 0x33 60M 3M",
            "-c",
            "discard 100M 2M",
            vm,
        )
        step("second backup: incremental from the qcow2 dirty bitmap")
        tessera("backup", "image", vm, "--store", store)
        step("a clone of the VM: only its differing chunks are stored")
        sh("qemu-img", "convert", "-O", "qcow2", vm, clone)
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 30M 1M", clone)
        tessera("backup", "image", clone, "--store", store)
        step("restore the incremental into a new image and compare")
        snaps = tessera("snapshots", "--store", store).splitlines()[1:]
        incremental = next(line.split()[0] for line in snaps if "incremental" in line)
        restored = work / "restored.qcow2"
        tessera("restore", incremental, "--store", store, "--to", restored)
        subprocess.run(["qemu-img", "compare", vm, restored], check=True)
        step("the store: dedup and compression, then a full verify")
        tessera("store", "info", store)
        tessera("store", "verify", store, "--data")
        print("\nNext: README.md (tour), docs/DESIGN.md, `tessera --help`.")


if __name__ == "__main__":
    main()
