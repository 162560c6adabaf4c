"""Pipeline bench: backup and restore of generated disk images through the CLI.

Measured in the same run, as ratios:

- full backup MB/s of a 1 GiB image (real files, zeros, 256 MiB incompressible; no
  duplicates inside; data bytes of non-zero slots per second of the job; the median of
  three into fresh stores, dirty pages flushed first) vs the store bench's
  CPU limit and vs the raw qemu-nbd read rate of the same bytes (4 connections, no
  processing); target ≥ 0.85 of the lower;
- incremental with 2 % of the data slots dirty vs the full's time (target ≤ 0.15);
- restore MB/s vs the restore CPU limit (decrypt + decompress + hash; target ≥ 0.5) and vs
  backup MB/s;
- the seconds per GiB of data that a full backup holds the GIL (``py-spy --gil``, sampled
  without stopping the process; imports and the fixed cost of a run excluded: see
  ``gil_figures``), through qemu-nbd and read directly: the work no extra core can share,
  and the throughput ceiling it implies for one process on any number of cores (target
  ≥ 3 GB/s, from the worse path);
- peak RSS of the backup and of the restore process for a 1 GiB and an 8 GiB disk (target
  ≤ 120 MiB, flat in disk size);
- ``qemu-img convert`` of the same image to a local raw file, as a speed reference;
- a full backup of the same image converted to raw (sparse), which is read directly (no
  qemu-nbd), and one of the qcow2 image, back to back: MB/s of data and CPU seconds (the CLI
  and its qemu-nbd) of raw vs qcow2, and raw MB/s vs the raw read limit of that file
  (``preadv`` of its data extents by 4 threads, no processing); and what dropping each read
  range from the page cache costs direct readers of a loop device over that file;
- BorgBackup (zstd-3, fixed 4 MiB chunks, encrypted) on that raw file: stored bytes (target:
  Tessera's ≤ 1.02 × borg's), wall and CPU time against Tessera's.
"""

import asyncio
import json
import os
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.io.direct import DirectImage
from engine.io.nbd.client import connect, extents
from engine.io.qemu import QemuNbd
from tests.bench.data import CACHE, fs_image, job_summary

MB = 1e6
ROOT = Path(__file__).resolve().parents[2]
# Without PYTHONDONTWRITEBYTECODE (set on some machines): an installed tessera has its
# bytecode compiled, so the CLI runs are measured with it, not compiling every module.
ENV = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    "TESSERA_PASSPHRASE": "bench",
}
GIL_RATE = 1000  # py-spy samples per second
FULL_RUNS = 3  # full backups timed, the median reported
GIL_RUNS = 3  # per image and path: py-spy shares the two cores, so single runs are noisy


def mixed_image(path: Path, size_gib: int, seed: int) -> Path:
    """qcow2 of ``size_gib`` GiB: each GiB is the real-files ext4 image (its free space is
    zeros) with its last 256 MiB replaced by incompressible data. Every GiB differs in its
    first block, so a 1 GiB image has no internal duplicates; larger ones dedup between their
    copies (they are for the memory figure, not the throughput ones)."""
    if path.exists():
        return path
    fs = fs_image(1024).read_bytes()
    rng = random.Random(seed)
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        for copy in range(size_gib):
            block = bytearray(fs[: 768 * 2**20])
            block[1024 : 1024 + 8] = (seed * 1000 + copy).to_bytes(8, "little")
            f.write(block)
            for _ in range(16):  # randbytes of 256 MiB at once overflows a C int
                f.write(rng.randbytes(16 * 2**20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    raw.unlink()
    return path


def cli(args: Sequence[str | Path], under: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """One CLI run in a fresh child, ``under`` a wrapper (py-spy, GNU time) if given; raises
    RuntimeError with its output when it fails."""
    proc = subprocess.run(
        [*under, sys.executable, "-m", "engine.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=ENV,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join([*under, 'tessera'])} {args}: {proc.stdout}{proc.stderr}")
    return proc


def tessera(*args: str | Path) -> tuple[str, float]:
    """(stdout, wall seconds) of one CLI run."""
    t = time.perf_counter()
    out = cli(args).stdout
    return out, time.perf_counter() - t


def job_figures(out: str) -> tuple[float, float, float]:
    """(MiB read, job seconds, MB/s) from a backup summary line."""
    return job_summary(out)


async def raw_read_rate(image: Path, connections: int = 4) -> float:
    """MB/s reading every data extent of ``image`` through qemu-nbd, no processing."""
    async with QemuNbd(image, "qcow2", read_only=True, shared=connections + 1) as export:
        control = await connect(export.address)
        data = [e async for e in extents(control, 0, control.export_size) if not e.zero]
        await control.close()
        slices = [
            (e.start + o, min(4 * 2**20, e.length - o))
            for e in data
            for o in range(0, e.length, 4 * 2**20)
        ]
        clients = [await connect(export.address) for _ in range(connections)]
        total = sum(n for _, n in slices)
        t = time.perf_counter()

        async def worker(i: int) -> None:
            buf = bytearray(4 * 2**20)
            for offset, n in slices[i::connections]:
                await clients[i].readinto(offset, memoryview(buf)[:n])

        await asyncio.gather(*(worker(i) for i in range(connections)))
        seconds = time.perf_counter() - t
        for c in clients:
            await c.close()
    return total / seconds / MB


def dirty_one_percent(image: Path, chunk: int, percent: float = 1.0) -> None:
    """Write ``percent`` % of the image's data slots (scattered 4 KiB writes, one per slot)."""
    info = subprocess.run(
        ["qemu-img", "map", "--output=json", image], capture_output=True, text=True, check=True
    ).stdout
    data_slots = sorted(
        {
            (e["start"] + o) // chunk
            for e in json.loads(info)
            if e["data"]
            for o in range(0, e["length"], chunk)
        }
    )
    rng = random.Random(7)
    chosen = rng.sample(data_slots, max(1, int(len(data_slots) * percent / 100)))
    argv = ["qemu-io", "-f", "qcow2"]
    for slot in chosen:
        argv += ["-c", f"write -P 0x{rng.randrange(1, 255):02x} {slot * chunk} 4k"]
    subprocess.run([*argv, image], check=True, capture_output=True)


def gil_seconds(args: list[str | Path]) -> tuple[float, float, str]:
    """(seconds any thread held the GIL, of which importing modules, stdout) of one CLI
    run, from ``py-spy record --gil``: it samples only the thread holding the GIL, so
    samples / rate is the time the GIL was held. ``--nonblocking``: the process is never
    paused."""
    out = CACHE / "gil.txt"
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    rate, fmt = ["--rate", str(GIL_RATE)], ["--format", "raw", "--output", str(out)]
    proc = cli(args, [py_spy, "record", "--gil", "--nonblocking", *rate, *fmt, "--"])
    held = imports = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        held += int(count)
        if "_find_and_load" in stack:
            imports += int(count)
    out.unlink()
    return held / GIL_RATE, imports / GIL_RATE, proc.stdout


def run(report, limits: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    work = CACHE / "pipeline"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = work / "disk-1g.qcow2"
    shutil.copy(mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1), image)
    store = work / "store"
    tessera("store", "init", store)

    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, work / "convert.raw"], check=True)
    convert = time.perf_counter() - t
    (work / "convert.raw").unlink()

    raw = asyncio.run(raw_read_rate(image))
    # The copy and the convert above leave ~2 GiB of dirty pages: written back during the
    # backup they took a third of its rate (one run measured 294 MB/s where a quiet one
    # makes ~530). Flushed first, and the median of FULL_RUNS backups into fresh stores.
    os.sync()
    runs = []
    for n in range(FULL_RUNS):
        if n:
            shutil.rmtree(store)
            tessera("store", "init", store)
        out, wall = tessera("backup", "image", image, "--store", store, "--level", "full")
        runs.append((job_figures(out)[1], wall, job_figures(out)[0]))
    job_full, wall_full, mib = sorted(runs)[len(runs) // 2]
    backup_rate = mib * 2**20 / job_full / MB
    report("pipeline_data_read", mib * 2**20 / MB, "MB")
    report("qemu_img_convert_seconds", convert, "s")
    report("qemu_img_convert_rate", 2**30 / convert / MB, "MB/s")
    report("qemu_nbd_raw_read_rate", raw, "MB/s")
    report("backup_full_rate", backup_rate, "MB/s")
    report("backup_full_vs_cpu_limit", backup_rate / limits["backup"], "ratio")
    report("backup_full_vs_nbd_read", backup_rate / raw, "ratio")
    report("backup_full_vs_lower_limit", backup_rate / min(limits["backup"], raw), "ratio")

    gil_figures(report, work, image)

    dirty_one_percent(image, 1024 * 1024, percent=2)
    out, wall_inc = tessera("backup", "image", image, "--store", store, "--level", "incremental")
    _, job_inc, _ = job_figures(out)
    report("backup_incremental_2pct_seconds", job_inc, "s")
    report("backup_incremental_2pct_vs_full_time", job_inc / job_full, "ratio")
    report("backup_incremental_2pct_vs_full_wall_incl_startup", wall_inc / wall_full, "ratio")

    snaps = tessera("snapshots", "--store", store)[0].splitlines()[1:]
    full_id = snaps[0].split()[0]
    out, _ = tessera("restore", full_id, "--store", store, "--to", work / "restored.qcow2")
    m = re.search(r"restored disk .* in ([\d.]+) s", out)
    assert m, out
    restore_rate = mib * 2**20 / float(m.group(1)) / MB
    report("restore_rate_data", restore_rate, "MB/s")
    report("restore_vs_cpu_limit", restore_rate / limits["restore"], "ratio")
    report("restore_vs_backup", restore_rate / backup_rate, "ratio")

    raw_direct(report, work)

    rss: dict[tuple[str, int], int] = {}
    for gib in (1, 8):
        img = mixed_image(CACHE / f"mixed-{gib}g.qcow2", gib, seed=gib)
        s = work / f"store-{gib}"
        tessera("store", "init", s)
        rss["backup", gib] = max_rss_of(["backup", "image", img, "--store", s, "--level", "full"])
        report(f"backup_peak_rss_{gib}gib", rss["backup", gib] / 1024, "MiB")
        snap = tessera("snapshots", "--store", s)[0].splitlines()[1].split()[0]
        restored = work / f"restored-{gib}.qcow2"
        rss["restore", gib] = max_rss_of(["restore", snap, "--store", s, "--to", restored])
        report(f"restore_peak_rss_{gib}gib", rss["restore", gib] / 1024, "MiB")
        shutil.rmtree(s)
        restored.unlink()
    report("backup_peak_rss_8g_vs_1g", rss["backup", 8] / rss["backup", 1], "ratio")
    report("restore_peak_rss_8g_vs_1g", rss["restore", 8] / rss["restore", 1], "ratio")
    shutil.rmtree(work, ignore_errors=True)


def gil_figures(report, work: Path, image: Path) -> None:  # type: ignore[no-untyped-def]
    """GIL-held seconds per GiB of data for a full backup through qemu-nbd (the qcow2 image)
    and read directly (the same data as a raw file, as LAN-free reads a block device).

    Per GiB means per GiB *more*: each run's fixed cost (starting qemu-nbd, qemu-img calls,
    the pool's arena, the store's open and commit) is measured by backing up a 16 MiB image
    of random data the same way and subtracted, so the figure is the work that grows with
    the data, which is what a faster disk and more cores would have to share. Imports are
    left out of both. Medians of ``GIL_RUNS``; the ceiling is from the worse of the paths."""
    small = work / "gil-small.raw"
    small.write_bytes(random.Random(5).randbytes(16 * 2**20))
    small_qcow2 = work / "gil-small.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", small, small_qcow2], check=True)
    # On copies: a backup of ``image`` into another store would replace the bitmap that the
    # incremental reads from (a local image keeps only its store's checkpoints).
    big_qcow2, big_raw = work / "gil.qcow2", work / "gil.raw"
    shutil.copy(image, big_qcow2)
    subprocess.run(["qemu-img", "convert", "-O", "raw", image, big_raw], check=True)
    per_path = {}
    for name, big, little in (("nbd", big_qcow2, small_qcow2), ("direct", big_raw, small)):
        held: dict[Path, list[float]] = {big: [], little: []}
        data: dict[Path, float] = {}
        for _ in range(GIL_RUNS):
            for img in (big, little):
                store = work / "store-gil"
                tessera("store", "init", store)
                seconds, imports, out = gil_seconds(
                    ["backup", "image", img, "--store", store, "--level", "full"]
                )
                held[img].append(seconds - imports)
                data[img] = job_figures(out)[0] / 1024  # GiB of data read
                shutil.rmtree(store)
        fixed = statistics.median(held[little])
        per_gib = (statistics.median(held[big]) - fixed) / (data[big] - data[little])
        per_path[name] = per_gib
        report(f"backup_gil_seconds_per_gib_{name}", per_gib, "s/GiB")
        report(f"backup_gil_fixed_seconds_{name}", fixed, "s")
        report(f"backup_gil_ceiling_{name}", 2**30 / per_gib / MB, "MB/s")
    for f in (small, small_qcow2, big_qcow2, big_raw):
        f.unlink()
    worst = max(per_path.values())
    report("backup_gil_seconds_per_gib", worst, "s/GiB")
    report("backup_gil_ceiling", 2**30 / worst / MB, "MB/s")


def max_rss_of(args: list[str | Path]) -> int:
    """Peak RSS (KiB) of one CLI run, read from GNU time in a fresh child."""
    proc = cli(args, ["/usr/bin/time", "-f", "MAXRSS %M"])
    m = re.search(r"MAXRSS (\d+)", proc.stderr)
    assert m, proc.stderr
    return int(m.group(1))


def raw_direct(report, work: Path) -> None:  # type: ignore[no-untyped-def]
    """Full backups of the 1 GiB image as qcow2 (through qemu-nbd) and converted to a sparse
    raw file (read directly), back to back into fresh stores: MB/s of data and CPU seconds
    of the whole run (the CLI and its qemu-nbd); and plain reads of the raw file's data."""
    pristine = mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1)  # before any dirtying
    qcow2, raw = work / "pair.qcow2", work / "pair.raw"
    shutil.copy(pristine, qcow2)  # its backup adds a bitmap: never to the cached image
    subprocess.run(["qemu-img", "convert", "-O", "raw", pristine, raw], check=True)
    limit = asyncio.run(raw_file_read_rate(raw))
    drop_cache_rates(report, raw)
    figures = {}
    for image in (qcow2, raw):
        store = work / f"store-{image.suffix[1:]}"
        tessera("store", "init", store)
        before = cpu_of_children()
        out, wall = tessera("backup", "image", image, "--store", store, "--level", "full")
        cpu = cpu_of_children() - before
        mib, seconds, _ = job_figures(out)
        figures[image.suffix] = (mib * 2**20 / seconds / MB, cpu)
        if image is raw:
            stored = sum(f.stat().st_size for f in (store / "packs").rglob("*") if f.is_file())
            borg_figures(report, raw, stored, wall, cpu)
        shutil.rmtree(store)
        image.unlink()
    (q_rate, q_cpu), (r_rate, r_cpu) = figures[".qcow2"], figures[".raw"]
    report("raw_file_read_rate", limit, "MB/s")
    report("backup_full_qcow2_pair_rate", q_rate, "MB/s")
    report("backup_full_raw_direct_rate", r_rate, "MB/s")
    report("backup_full_raw_vs_qcow2", r_rate / q_rate, "ratio")
    report("backup_full_raw_vs_file_read", r_rate / limit, "ratio")
    report("backup_full_qcow2_cpu_seconds", q_cpu, "s")
    report("backup_full_raw_cpu_seconds", r_cpu, "s")
    report("backup_full_raw_vs_qcow2_cpu", r_cpu / q_cpu, "ratio")


def borg_figures(  # type: ignore[no-untyped-def]
    report, raw: Path, stored: int, wall: float, cpu: float
) -> None:
    """BorgBackup (Debian's borgbackup, ``make bench`` installs it) on the same raw file,
    encrypted, zstd level 3, fixed 4 MiB chunks (what a VM image backup with borg uses):
    its stored bytes (``unique_csize``) against Tessera's packs for the same data (target:
    Tessera ≤ 1.02 ×), and its wall and CPU seconds against Tessera's whole CLI run."""
    repo = raw.with_name("borg-repo")
    shutil.rmtree(repo, ignore_errors=True)
    env = {**os.environ, "BORG_PASSPHRASE": "bench", "BORG_BASE_DIR": str(raw.parent / "borg")}
    subprocess.run(
        ["borg", "init", "-e", "repokey-blake2", repo], env=env, check=True, capture_output=True
    )
    before = cpu_of_children()
    t = time.perf_counter()
    subprocess.run(
        [
            "borg", "create", "--compression", "zstd,3", "--chunker-params", "fixed,4194304",
            f"{repo}::bench", raw.name,
        ],
        cwd=raw.parent, env=env, check=True,
    )  # fmt: skip
    borg_wall, borg_cpu = time.perf_counter() - t, cpu_of_children() - before
    info = subprocess.run(
        ["borg", "info", "--json", repo], env=env, check=True, capture_output=True, text=True
    )
    borg_stored = json.loads(info.stdout)["cache"]["stats"]["unique_csize"]
    shutil.rmtree(repo)
    shutil.rmtree(raw.parent / "borg", ignore_errors=True)
    report("borg_zstd3_stored_bytes", borg_stored, "B")
    report("tessera_stored_bytes", stored, "B")
    report("tessera_stored_vs_borg_zstd3", stored / borg_stored, "ratio")
    report("tessera_backup_wall_vs_borg", wall / borg_wall, "ratio")
    report("tessera_backup_cpu_vs_borg", cpu / borg_cpu, "ratio")


def cpu_of_children() -> float:
    """CPU seconds (user + system) of every reaped child so far, their own reaped children
    (a CLI run's qemu-nbd) included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def raw_file_read_rate(image: Path, threads: int = 4) -> float:
    """MB/s reading every data extent of the raw file ``image`` with ``preadv`` in 4 MiB
    pieces by ``threads`` threads, no processing: what a direct reader can get."""
    direct = await DirectImage.open(image, disk=str(image))
    try:
        data = [e for e in await direct.extents(0, direct.size) if not e.zero]
    finally:
        await direct.close()
    slices = [
        (e.start + o, min(4 * 2**20, e.length - o))
        for e in data
        for o in range(0, e.length, 4 * 2**20)
    ]
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)

    def worker(share: list[tuple[int, int]]) -> None:
        buf = memoryview(bytearray(4 * 2**20))
        for offset, n in share:
            if os.preadv(fd, [buf[:n]], offset) != n:
                raise RuntimeError(f"short read at {offset} of {image}")

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, [slices[i::threads] for i in range(threads)]))
        seconds = time.perf_counter() - t
    finally:
        os.close(fd)
    return sum(n for _, n in slices) / seconds / MB


def drop_cache_rates(report, image: Path) -> None:  # type: ignore[no-untyped-def]
    """What ``drop_cache`` (FADV_DONTNEED after each read, the DataMover's devices) costs: 4
    direct readers of a loop device over ``image``, 1 MiB pieces, each pass starting with the
    device's cache dropped; best of 3 with and without. Skipped without a loop device."""
    made = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        print(f"# no loop device, drop-cache figures skipped: {made.stderr.strip()}")
        return
    device = Path(made.stdout.strip())
    try:
        best = {False: 0.0, True: 0.0}
        for _ in range(3):
            for drop in (False, True):
                best[drop] = max(best[drop], asyncio.run(device_read_rate(device, drop)))
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)
    report("direct_device_read_rate", best[False], "MB/s")
    report("direct_device_read_rate_drop_cache", best[True], "MB/s")
    report("direct_drop_cache_vs_keep", best[True] / best[False], "ratio")


async def device_read_rate(device: Path, drop: bool, readers: int = 4) -> float:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start with nothing cached
    finally:
        os.close(fd)
    direct = await DirectImage.open(device, disk=str(device), drop_cache=drop)
    pieces = list(range(0, direct.size, 2**20))

    async def reader(share: list[int]) -> None:
        conn = await direct.open_reader()
        buf = memoryview(bytearray(2**20))
        try:
            for offset in share:
                await conn.readinto(offset, buf[: min(2**20, direct.size - offset)])
        finally:
            await conn.close()

    try:
        t = time.perf_counter()
        await asyncio.gather(*(reader(pieces[i::readers]) for i in range(readers)))
        seconds = time.perf_counter() - t
    finally:
        await direct.close()
    return direct.size / seconds / MB
