"""oVirt bench: a lab VM backed up through the fake engine + real ovirt-imageio + qemu-nbd.

Measured in the same run:

- full backup (``tessera backup vm``, 4 readers) MB/s of data vs ``ovirt_imageio.client.
  download`` of the same disk through the same daemon (4 workers) — target ≥ 1.0 for a full;
- incremental with 1 % of the data slots dirty vs the full's time;
- the same full backup of the image as a local file (``tessera backup image``), for the
  cost of the imageio path over NBD: the rate's ratio, the CLI's CPU per GiB of each
  (``ovirt_full_cpu_vs_local``: what the imageio path costs the DataMover), and the most the
  ratio can be here (``ovirt_full_vs_local_best``: the lab's imageio daemon, engine and
  qemu-nbd share the machine's cores, which on a site run on the hypervisors);
- full backups are medians of three into fresh stores, dirty pages flushed before each;
- a copy-only read of the disk's data through ``ImageioReader`` (as the backup reads it:
  ``DEFAULT_READERS`` connections with ``PIPELINE`` GETs in flight on each, one GET per
  1 MiB chunk, on uvloop): the CPU seconds per
  GiB of this process only (the client: TLS, HTTP, the event loop) and of the imageio daemon,
  medians of 3.
"""

import asyncio
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from ovirt_imageio import client as imageio_client

from engine.io.qemu import QemuNbd
from engine.pipeline.defaults import DEFAULT_READERS
from engine.store.layout import DEFAULT_CHUNK_SIZE
from engine.util.aio import run as run_on_uvloop
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt.engine_ca import EngineCa
from plugins.ovirt.imageio import ImageioDisk, ImageioReader
from tests.bench.data import CACHE, job_summary
from tests.bench.pipeline_bench import dirty_one_percent, mixed_image

MB = 1e6
GiB = 2**30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[2]
RUNS = 3  # full backups of each kind, the median reported
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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) another process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu() -> float:
    """CPU seconds of the waited-for children so far (the CLI runs and their qemu-nbd)."""
    t = os.times()
    return t.children_user + t.children_system


def machine_cpu() -> float:
    """CPU seconds every process of the machine used so far (/proc/stat, all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


async def timed_backups(*args: str | Path, fresh: Path | None = None) -> dict[str, float]:
    """Median over ``RUNS`` full backups (``fresh``: that store re-made before each) of: the
    data bytes, the job's seconds, the CLI's own CPU seconds (with its qemu-nbd) and the
    machine's (imageio daemon and engine included); dirty pages flushed first."""
    runs = []
    for _ in range(RUNS):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
            await tessera("store", "init", fresh)
        os.sync()
        ours, machine = children_cpu(), machine_cpu()
        data, seconds = figures(await tessera(*args))
        runs.append(
            {
                "seconds": seconds,
                "data": data,
                "cpu": children_cpu() - ours,
                "machine_cpu": machine_cpu() - machine,
            }
        )
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


async def read_through_imageio(url: str, ca: EngineCa) -> int:
    """Read every data extent of the disk as a backup does, into reused buffers; the bytes."""
    async with await ImageioDisk.connect(url, ca=ca) as disk:
        ranges = [
            (offset, min(DEFAULT_CHUNK_SIZE, e.end - offset))
            for e in await disk.extents("zero", 0, await disk.size())
            if not e.zero
            for offset in range(e.start, e.end, DEFAULT_CHUNK_SIZE)
        ]
        todo = iter(ranges)

        async def lane(r: ImageioReader) -> None:
            buf = memoryview(bytearray(DEFAULT_CHUNK_SIZE))
            for offset, length in todo:
                await r.readinto(offset, buf[:length])

        async def reader() -> None:
            r = await disk.open_reader()
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(r.pipeline):  # as the backup's lanes
                        tg.create_task(lane(r))
            finally:
                await r.close()

        async with asyncio.TaskGroup() as tg:
            for _ in range(DEFAULT_READERS):
                tg.create_task(reader())
        return sum(length for _, length in ranges)


async def imageio_read_cpu(daemon: ImageioDaemon, image: Path) -> tuple[float, float]:
    """(client, daemon) CPU seconds per GiB of a copy-only read, medians of 3."""
    assert daemon.pid is not None
    client, server = [], []
    async with QemuNbd(image, "qcow2", read_only=True) as export:
        ticket = str(uuid.uuid4())
        await daemon.add_ticket(ticket, f"nbd:unix:{export.address}", GiB, ["read"])
        ca = EngineCa.from_file(daemon.ca_file)
        for _ in range(3):
            ours, theirs = own_cpu(), process_cpu(daemon.pid)
            data = await read_through_imageio(daemon.data_url(ticket), ca)
            client.append((own_cpu() - ours) / (data / GiB))
            server.append((process_cpu(daemon.pid) - theirs) / (data / GiB))
        await daemon.remove_ticket(ticket)
    return statistics.median(client), statistics.median(server)


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
        client_cpu, daemon_cpu = await imageio_read_cpu(daemon, image)
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
            ovirt = await timed_backups(
                "backup", "vm", "bench", "--config", config, "--level", "full",
                fresh=work / "store",
            )  # fmt: skip
            data, full = ovirt["data"], ovirt["seconds"]
            dirty_one_percent(image, 1024 * 1024)
            _, inc = figures(await tessera("backup", "vm", "bench", "--config", config))
    local = await timed_backups(
        "backup", "image", image, "--store", work / "store-local", "--level", "full",
        fresh=work / "store-local",
    )  # fmt: skip
    local_rate = local["data"] / local["seconds"]
    report("ovirt_full_backup_rate", data / full / MB, "MB/s")
    report("imageio_client_download_rate", data / ref_seconds / MB, "MB/s")
    report("ovirt_full_vs_imageio_download", ref_seconds / full, "ratio")
    report("ovirt_incremental_1pct_vs_full_time", inc / full, "ratio")
    report("ovirt_full_vs_local_image_backup", (data / full) / local_rate, "ratio")
    # What the imageio path costs the DataMover, and the most the ratio above can be here:
    # the lab's imageio daemon, engine and qemu-nbd share this machine's cores (on a real
    # site they run on the hypervisors). Best: the local run's seconds for these bytes over
    # the least the lab run could take doing every process's CPU work on all cores.
    cores = os.cpu_count() or 1
    report("ovirt_full_cpu_per_gib", ovirt["cpu"] / (data / GiB), "s/GiB")
    report("local_image_full_cpu_per_gib", local["cpu"] / (local["data"] / GiB), "s/GiB")
    report(
        "ovirt_full_cpu_vs_local",
        (ovirt["cpu"] / data) / (local["cpu"] / local["data"]),
        "ratio",
    )
    report(
        "ovirt_full_vs_local_best",
        min(1.0, (data / local_rate) / (ovirt["machine_cpu"] / cores)),
        "ratio",
    )
    report("imageio_read_client_cpu_per_gib", client_cpu, "s/GiB")
    report("imageio_read_daemon_cpu_per_gib", daemon_cpu, "s/GiB")
    shutil.rmtree(work, ignore_errors=True)


def run(report) -> None:  # type: ignore[no-untyped-def]
    run_on_uvloop(bench(report))  # as the CLI runs: its event loop is part of the client's CPU
