"""A store whose packs live in a bucket (issue 18), against the same store on local disk, in
the same run: a real single-node Ceph RGW on loopback (``tests.s3.rgw``), the pipeline
bench's 1 GiB image (real files, zeros, 256 MiB incompressible), medians of 3 rounds
interleaved (local, then bucket: a slow moment of the machine hits both).

- ``s3_backup_seconds`` / ``local_backup_seconds``: a full ``backup image`` (wall, the CLI's);
- ``s3_backup_vs_local``: local seconds over bucket seconds, the rate's fraction (target
  ≥ 0.8);
- ``s3_restore_seconds`` / ``local_restore_seconds``: ``restore --format raw`` of that
  snapshot; the bucket's with its cache emptied first, so every pack comes from RGW;
- ``s3_restore_vs_local``: the same fraction for restores (target ≥ 0.8);
- ``s3_backup_job_vs_local`` / ``s3_restore_job_vs_local``: the same from the jobs' own
  seconds (their summary lines), without the CLI's start and the store's open and close —
  where a bucket costs ~0.5 s more per run (a writer's probe, lock and listing at ~45 ms per
  small request on RGW, measured 2026-12-07) that a long backup amortises;
- ``s3_backup_best`` / ``s3_restore_best``: the most ``…_vs_local`` could be on this machine,
  where RGW (radosgw, ceph-osd, ceph-mon, ceph-mgr) shares the cores: the local run's wall
  seconds over the least the bucket's run could take doing its CPU work and RGW's (their CPU
  seconds / cores), capped at 1; ``rgw_cpu_seconds_per_gib_backup`` / ``…_restore``: RGW's
  CPU per GiB of the image;
- ``s3_puts_per_gib_stored``: PUT requests of the backup per GiB of packs stored, against
  ``s3_one_object_per_chunk_per_gib`` (a PUT per stored chunk, PBS's way):
  ``s3_requests_vs_object_per_chunk`` is their ratio (target ≤ 1/16).

The RGW shares the machine's two cores with Tessera, as it would not in production: its
CPU use is part of what the ratios measure.

    python -m tests.bench s3
"""

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.data import CACHE
from tests.bench.pipeline_bench import ENV, ROOT, mixed_image
from tests.s3.rgw import Rgw, empty_and_remove_bucket, start_rgw, stop_rgw

Report = Callable[[str, float, str], None]
ROUNDS = 3
GiB = 1024**3


def run(report: Report) -> None:
    work = CACHE / "s3"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1)
    rgw = start_rgw()
    admin = rgw.botocore()
    bucket = "bench"
    admin.create_bucket(Bucket=bucket)
    try:
        times: dict[str, list[float]] = {k: [] for k in ("lb", "lr", "sb", "sr")}
        jobs: dict[str, list[float]] = {k: [] for k in ("lb", "lr", "sb", "sr")}
        puts: list[float] = []
        per_chunk: list[float] = []
        for n in range(ROUNDS):
            local = work / f"local-{n}"
            cli(["store", "init", local], rgw)
            run_into(
                times,
                jobs,
                "lb",
                ["backup", "image", image, "--store", local, "--level", "full"],
                rgw,
            )
            restore(local, work / "out-local", rgw, times, jobs, "lr")
            shutil.rmtree(local)

            s3 = work / f"s3-{n}"
            prefix = f"round-{n}"
            cli(
                ["store", "init", s3, "--s3", f"s3://{bucket}/{prefix}", "--s3-endpoint", rgw.url],
                rgw,
            )
            run_into(
                times, jobs, "sb", ["backup", "image", image, "--store", s3, "--level", "full"], rgw
            )
            info = json.loads(cli(["store", "info", s3, "--json"], rgw))
            packs = count(admin, bucket, f"{prefix}/packs/")
            stored_gib = info["pack_bytes"] / GiB
            puts.append(packs / stored_gib)
            per_chunk.append(info["chunks"] / stored_gib)
            for cached in (s3 / "packs").glob("??/*.pack"):  # every pack from RGW
                cached.unlink()
            restore(s3, work / "out-s3", rgw, times, jobs, "sr")
            shutil.rmtree(s3)
        med = {k: statistics.median(v) for k, v in times.items()}
        report("local_backup_seconds", med["lb"], "s")
        report("s3_backup_seconds", med["sb"], "s")
        report("s3_backup_vs_local", med["lb"] / med["sb"], "ratio")
        report("local_restore_seconds", med["lr"], "s")
        report("s3_restore_seconds", med["sr"], "s")
        report("s3_restore_vs_local", med["lr"] / med["sr"], "ratio")
        job = {k: statistics.median(v) for k, v in jobs.items()}
        report("s3_backup_job_vs_local", job["lb"] / job["sb"], "ratio")
        report("s3_restore_job_vs_local", job["lr"] / job["sr"], "ratio")
        cores = os.cpu_count() or 1
        image_gib = image_bytes(image) / GiB
        for what, k in (("backup", "b"), ("restore", "r")):
            ours, theirs = statistics.median(CPU["s" + k]), statistics.median(CPU["r" + k])
            least = (ours + theirs) / cores
            report(f"s3_{what}_best", min(1.0, med["l" + k] / least), "ratio")
            report(f"rgw_cpu_seconds_per_gib_{what}", theirs / image_gib, "s")
        report("s3_puts_per_gib_stored", statistics.median(puts), "requests")
        report("s3_one_object_per_chunk_per_gib", statistics.median(per_chunk), "requests")
        report(
            "s3_requests_vs_object_per_chunk",
            statistics.median(puts) / statistics.median(per_chunk),
            "ratio",
        )
    finally:
        empty_and_remove_bucket(admin, bucket)
        admin.close()
        stop_rgw(rgw)
        shutil.rmtree(work, ignore_errors=True)


def cli(args: list[object], rgw: Rgw) -> str:
    env = {**ENV, "AWS_ACCESS_KEY_ID": rgw.access_key, "AWS_SECRET_ACCESS_KEY": rgw.secret_key}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tessera {args}: {proc.stdout}{proc.stderr}")
    return proc.stdout


JOB_SECONDS = re.compile(r"succeeded: .*?, ([\d.]+) s,")
Times = dict[str, list[float]]


CPU: Times = {k: [] for k in ("sb", "sr", "rb", "rr")}  # the bucket runs': ours, RGW's


def run_into(times: Times, jobs: Times, key: str, args: list[object], rgw: Rgw) -> None:
    """Run the CLI: its wall seconds into ``times``, its job's own seconds into ``jobs``
    (for the bucket's runs, the CPU seconds of the CLI and of RGW into ``CPU``)."""
    ours, theirs = children_cpu(), rgw_cpu()
    t = time.perf_counter()
    out = cli(args, rgw)
    times[key].append(time.perf_counter() - t)
    if key in ("sb", "sr"):
        CPU[key].append(children_cpu() - ours)
        CPU["r" + key[1]].append(rgw_cpu() - theirs)
    m = JOB_SECONDS.search(out)
    assert m, out
    jobs[key].append(float(m.group(1)))


def restore(store: Path, out: Path, rgw: Rgw, times: Times, jobs: Times, key: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    snap = json.loads(cli(["snapshots", "--store", store, "--json"], rgw))[0]["id"]
    args: list[object] = ["restore", snap, "--store", store, "--to", out, "--format", "raw"]
    run_into(times, jobs, key, args, rgw)
    shutil.rmtree(out)
    os.sync()


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rgw_cpu() -> float:
    """CPU seconds of every running Ceph daemon (RGW and the cluster behind it)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].partition("(")[2]
            if name in ("radosgw", "ceph-osd", "ceph-mon", "ceph-mgr"):
                parts = fields[1].split()
                total += (int(parts[11]) + int(parts[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def image_bytes(image: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", image], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)["virtual-size"])


def count(client: object, bucket: str, prefix: str) -> int:
    n = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)  # type: ignore[attr-defined]
    for page in pages:
        n += len(page.get("Contents", []))
    return n
