"""Export bench: reading a snapshot's disk through ``tessera export`` (NBD) against restoring
it locally, in the same run, on the pipeline bench's 1 GiB image (real files, zeros, 256 MiB
incompressible).

- ``restore_local_rate``: data MB/s of ``tessera restore --to X.raw --format raw`` (the
  disk phase its summary reports);
- ``export_nbdcopy_rate`` / ``export_nbdcopy_1conn_rate``: data MB/s of ``nbdcopy`` from
  the export to a raw file with 4 connections / 1 (wall time of nbdcopy, the server already
  listening; zero slots are holes nbdcopy skips, as the restore skips them);
- ``export_vs_restore``: the 4-connection rate over the local restore's;
- ``export_reread_rate``: a second nbdcopy of the same export: what the chunk cache gives
  back (most of the disk is larger than the cache, so little).

    python -m tests.bench export
"""

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.bench.data import CACHE, job_summary
from tests.bench.pipeline_bench import ENV, ROOT, mixed_image, tessera

MB = 1e6
Report = Callable[[str, float, str], None]


def nbdcopy_seconds(uri: str, out: Path, connections: int) -> float:
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(["nbdcopy", f"--connections={connections}", uri, str(out)], check=True)
    return time.perf_counter() - t


def run(report: Report) -> None:
    work = CACHE / "export"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = mixed_image(CACHE / "mixed-1g-a.qcow2", 1, seed=1)
    store = work / "store"
    tessera("store", "init", store)
    out, _ = tessera("backup", "image", image, "--store", store, "--level", "full")
    mib, _, _ = job_summary(out)
    data = mib * 2**20
    snap = tessera("snapshots", "--store", store)[0].splitlines()[1].split()[0]

    out, _ = tessera(
        "restore", snap, "--store", store, "--to", work / "restored.raw", "--format", "raw"
    )
    m = re.search(r"restored disk .* in ([\d.]+) s", out)
    assert m, out
    restore_rate = data / float(m.group(1)) / MB
    report("restore_local_rate", restore_rate, "MB/s")

    sock = work / "export.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli.main",
            "export",
            snap,
            "--store",
            str(store),
            "--socket",
            str(sock),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri, "tessera export did not start"
        four = nbdcopy_seconds(uri, work / "copy.raw", 4)
        again = nbdcopy_seconds(uri, work / "copy.raw", 4)
        one = nbdcopy_seconds(uri, work / "copy.raw", 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    rate = data / four / MB
    report("export_nbdcopy_rate", rate, "MB/s")
    report("export_nbdcopy_1conn_rate", data / one / MB, "MB/s")
    report("export_reread_rate", data / again / MB, "MB/s")
    report("export_vs_restore", rate / restore_rate, "ratio")
    shutil.rmtree(work, ignore_errors=True)
