"""oVirt bench: a lab VM backed up through the fake engine + real ovirt-imageio + qemu-nbd.

Measured in the same run:

- full backup (``tessera backup vm``, 4 readers) MB/s of data vs ``ovirt_imageio.client.
  download`` of the same disk through the same daemon (4 workers) — target ≥ 1.0 for a full;
- incremental with 1 % of the data slots dirty vs the full's time;
- the same full backup of the image as a local file (``tessera backup image``), for the
  cost of the imageio path over NBD.
"""

import asyncio
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from ovirt_imageio import client as imageio_client

from engine.io.qemu import QemuNbd
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from tests.bench.data import CACHE, job_summary
from tests.bench.pipeline_bench import dirty_one_percent, mixed_image

MB = 1e6
ROOT = Path(__file__).resolve().parents[2]
SEED = Seed(vms=(VmSeed(name="bench", disks=(DiskSeed("bench_os", 2**30, bootable=True),)),))


async def tessera(*args: str | Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli.main",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TESSERA_PASSPHRASE": "bench"},
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"tessera {args}: {out.decode()}{err.decode()}")
    return out.decode()


def figures(out: str) -> tuple[float, float]:
    """(bytes of data read, job seconds) from a backup's summary line."""
    mib, seconds, _ = job_summary(out)
    return mib * 2**20, seconds


async def reference_download(daemon: ImageioDaemon, image: Path, dest: Path) -> float:
    """Seconds for ovirt-imageio's own client to download the disk (raw, 4 workers)."""
    async with QemuNbd(image, "qcow2", read_only=True) as export:
        ticket = str(uuid.uuid4())
        await daemon.add_ticket(ticket, f"nbd:unix:{export.address}", 2**30, ["read"])
        t = time.perf_counter()
        await asyncio.to_thread(
            imageio_client.download,
            daemon.data_url(ticket),
            str(dest),
            str(daemon.ca_file),  # verified with the engine CA, as Tessera reads it
            fmt="raw",
            max_workers=4,
        )
        seconds = time.perf_counter() - t
        await daemon.remove_ticket(ticket)
    dest.unlink()
    return seconds


async def bench(report) -> None:  # type: ignore[no-untyped-def]
    work = CACHE / "ovirt"
    shutil.rmtree(work, ignore_errors=True)
    (work / "engine").mkdir(parents=True)
    image = work / "bench_os.qcow2"
    shutil.copy(mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1), image)
    probe = FakeEngine(SEED, work / "engine")
    disk_id = next(iter(probe.inventory.disks))
    async with ImageioDaemon(base_dir=work) as daemon:
        ref_seconds = await reference_download(daemon, image, work / "download.raw")
        engine = FakeEngine(SEED, work / "engine", images={disk_id: image}, imageio=daemon)
        async with engine:
            (work / "password").write_text(SEED.password + "\n")
            config = work / "config.yaml"
            config.write_text(
                f"stores:\n  - name: main\n    path: {work / 'store'}\n"
                f"engines:\n  - name: lab\n    url: {engine.url}\n"
                f"    username: {SEED.username}\n    password_file: {work / 'password'}\n"
                f"    ca_file: {engine.ca_file}\n"
            )
            await tessera("store", "init", work / "store")
            data, full = figures(
                await tessera("backup", "vm", "bench", "--config", config, "--level", "full")
            )
            dirty_one_percent(image, 1024 * 1024)
            _, inc = figures(await tessera("backup", "vm", "bench", "--config", config))
    await tessera("store", "init", work / "store-local")
    local_data, local = figures(
        await tessera("backup", "image", image, "--store", work / "store-local", "--level", "full")
    )
    report("ovirt_full_backup_rate", data / full / MB, "MB/s")
    report("imageio_client_download_rate", data / ref_seconds / MB, "MB/s")
    report("ovirt_full_vs_imageio_download", ref_seconds / full, "ratio")
    report("ovirt_incremental_1pct_vs_full_time", inc / full, "ratio")
    report("ovirt_full_vs_local_image_backup", (data / full) / (local_data / local), "ratio")
    shutil.rmtree(work, ignore_errors=True)


def run(report) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(bench(report))
