"""``make demo``: Tessera against the embedded lab — a fake oVirt engine, the real
ovirt-imageio daemon and qemu-nbd, and generated VM disks with real filesystems.

It starts the lab, creates an encrypted store, backs up two VMs (full) through the engine's
incremental-backup API, lets a "guest" write to one of them, backs it up again
(incremental: only the changed slots travel), takes a snapshot-based backup of the other VM
(OVF saved first), restores the incremental into a local image and compares it with the VM's
disk, then shows the snapshots, the store's figures and a full verify. It stops the lab and
removes everything at the end. (The daemon, its policies and the restore into the engine
come with the next issues.)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tessera(*args: str | Path, quiet: bool = False) -> str:
    print("$ tessera " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.daemon.cli", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, flush=True)
        raise SystemExit(f"demo: tessera {args[0]} failed ({proc.returncode})")
    if not quiet:
        print(proc.stdout, end="", flush=True)
    return proc.stdout


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        lab = Path(tmp) / "lab"
        config = lab / "tessera.yaml"
        try:
            step("start the lab: fake engine + ovirt-imageio + generated VM disks")
            tessera("lab", "up", "--dir", lab)
            doc = json.loads(tessera("lab", "show", "--dir", lab, "--json", quiet=True))
            os.environ["TESSERA_PASSPHRASE"] = (lab / "store-passphrase").read_text().strip()
            step("an encrypted store, as the lab's tessera.yaml describes it")
            tessera("store", "init", lab / "store")
            step("full backups of two VMs through the incremental-backup API")
            tessera("backup", "vm", "web01", "db01", "--config", config, "--level", "full")
            step("the guest of web01 writes (scattered blocks and a 4 MiB file)")
            web01 = next(vm for vm in doc["vms"] if vm["name"] == "web01")
            os_disk = Path(web01["disks"][0]["path"])
            subprocess.run(
                [
                    "qemu-io",
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x5a 5M 4k",
                    "-c",
                    "write -P 0x33 60M 4M",
                    os_disk,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            step("incremental backup of web01: only the changed slots travel")
            tessera("backup", "vm", "web01", "--config", config)
            step("a snapshot-based backup of db01 (OVF saved first, snapshot removed after)")
            tessera("backup", "vm", "db01", "--config", config, "--flow", "snapshot-imageio")
            step("restore web01's incremental into a local image and compare with the VM's disk")
            snaps = json.loads(tessera("snapshots", "--config", config, "--json", quiet=True))
            inc = next(
                s for s in snaps if s["vm"]["name"] == "web01" and s["level"] == "incremental"
            )
            out = Path(tmp) / "restored"
            out.mkdir()
            tessera(
                "restore",
                inc["id"],
                "--config",
                config,
                "--disk",
                "web01_os",
                "--to",
                out / "web01_os.qcow2",
            )
            subprocess.run(["qemu-img", "compare", os_disk, out / "web01_os.qcow2"], check=True)
            step("what the store holds")
            tessera("snapshots", "--config", config)
            tessera("store", "info", lab / "store")
            tessera("store", "verify", lab / "store", "--data")
        finally:
            step("stop the lab")
            tessera("lab", "down", "--dir", lab)
    print("\nNext: README.md (tour), docs/DESIGN.md, `tessera --help`.")


if __name__ == "__main__":
    main()
