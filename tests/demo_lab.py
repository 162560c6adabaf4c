"""``make demo``: Tessera as a service against the embedded lab — a fake oVirt engine, the
real ovirt-imageio daemon and qemu-nbd, and generated VM disks with real filesystems.

It starts the lab, creates an encrypted store, writes a policy for two VMs and starts the
daemon (`tessera run`) on the lab's config. Through the daemon's API it then runs the policy
(full backups of both VMs, progress followed live), lets a "guest" write to one VM, backs it
up again (incremental: only the changed slots travel), restores that snapshot as a new VM in
the engine, and restores it into a local image compared with `qemu-img compare`. It shows
the jobs, the snapshots, the store's dedup/compression figures and a full verify, then stops
the daemon and the lab and removes everything.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def tessera(*args: str | Path, quiet: bool = False) -> str:
    print("$ tessera " + " ".join(map(str, args)), flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *map(str, args)],
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


POLICY = """\
# A policy as an operator writes it (policies.d/*.yaml): what, when, how, how long.
name: demo
selection:
  vms: [web01, db01]
schedule: daily 02:00
level: {default: incremental, full_every: 7d}
retention: {keep_daily: 7, keep_weekly: 4}
"""


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    print(f"$ tessera run --config {config}  (in the background, log: {log})", flush=True)
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "engine.cli.main", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    for _ in range(300):
        if '"daemon.ready"' in log.read_text():
            return daemon
        if daemon.poll() is not None:
            break
        time.sleep(0.1)
    print(log.read_text())
    raise SystemExit("demo: the daemon did not start")


def follow_all(config: Path, count: int) -> None:
    """Follow the policy's ``count`` jobs until they end (the run lists the engine's VMs
    first, so wait for its jobs to appear)."""
    jobs: list[dict[str, str]] = []
    for _ in range(600):
        jobs = json.loads(tessera("jobs", "--config", config, "--json", quiet=True))
        if len(jobs) >= count:
            break
    for job in jobs:
        tessera("job", job["id"], "--config", config, "--follow")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tessera-demo-") as tmp:
        lab = Path(tmp) / "lab"
        config = lab / "tessera.yaml"
        daemon = None
        try:
            step("start the lab: fake engine + ovirt-imageio + generated VM disks")
            tessera("lab", "up", "--dir", lab)
            doc = json.loads(tessera("lab", "show", "--dir", lab, "--json", quiet=True))
            os.environ["TESSERA_PASSPHRASE"] = (lab / "store-passphrase").read_text().strip()
            step("an encrypted store, as the lab's tessera.yaml describes it")
            tessera("store", "init", lab / "store")
            step("a policy for two VMs, checked before the daemon starts")
            (lab / "policies.d").mkdir(exist_ok=True)
            (lab / "policies.d" / "demo.yaml").write_text(POLICY)
            print(POLICY)
            tessera("check-config", "--config", config)
            step("start the DataMover service")
            daemon = start_daemon(config, lab / "daemon.log")
            tessera("vms", "--config", config)
            tessera("policies", "--config", config)
            step("run the policy now: full backups of web01 and db01 (the first ones are full)")
            tessera("policies", "--config", config, "--run", "demo")
            follow_all(config, 2)  # web01 and db01
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
            step("incremental backup of web01 through the daemon: only the changed slots travel")
            tessera("backup", "vm", "web01", "--config", config)
            tessera("jobs", "--config", config)
            snaps = json.loads(tessera("snapshots", "--config", config, "--json", quiet=True))
            inc = next(
                s for s in snaps if s["vm"]["name"] == "web01" and s["level"] == "incremental"
            )
            step("restore web01's incremental as a new VM in the engine")
            tessera("restore", inc["id"], "--config", config, "--name", "web01-restored")
            tessera("lab", "show", "--dir", lab)
            step("stop the daemon (SIGTERM: running jobs would finish first)")
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=120)
            daemon = None
            step("restore the same snapshot into a local image, compared with the VM's disk")
            out = Path(tmp) / "restored"
            out.mkdir()
            tessera(
                "restore",
                inc["id"],
                "--store",
                lab / "store",
                "--disk",
                "web01_os",
                "--to",
                out / "web01_os.qcow2",
            )
            subprocess.run(["qemu-img", "compare", os_disk, out / "web01_os.qcow2"], check=True)
            step("what the store holds")
            tessera("snapshots", "--config", config)
            tessera("store", "status", lab / "store")
            tessera("store", "verify", lab / "store", "--data")
        finally:
            if daemon is not None:
                step("stop the daemon (SIGTERM: running jobs finish first)")
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=120)
            step("stop the lab")
            tessera("lab", "down", "--dir", lab)
    print(
        "\nNext: README.md (tour), docs/DESIGN.md, `tessera --help`; the daemon's API is "
        "described at GET /v1/openapi.json on its socket."
    )


if __name__ == "__main__":
    main()
