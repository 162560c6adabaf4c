"""Replication bench: pushes of a real filesystem image between two stores on loopback.

Measured in the same run, as ratios:

- replication MB/s (logical disk bytes per second of the job, 4 streams, the receiver in its
  own process, decoding and re-hashing every record) vs the local restore MB/s of the same
  snapshot (``tessera restore --to`` a raw file, same logical bytes);
- bytes on the wire (TCP, both ways, TLS included, counted by the delaying proxy) / record
  bytes the peer lacked (target ≤ 1.05); the body-only figure the job's summary prints, too;
- the same into an encrypted-only replica (CRC checks only, no decode and re-hash);
- with 50 ms added round trip (a delaying proxy: 25 ms each way, no throughput cap),
  MB/s with the default 4 streams vs 1 stream.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine.replication.job import run_replication
from engine.store.chunk_store import Store
from engine.store.manifest import Manifest
from tests.bench.data import CACHE, fs_image, job_summary
from tests.conftest import CHEAP_KDF, PASSPHRASE
from tests.unit.replication.support import Pki, Proxy, init_replica, make_pki, target

MB = 1e6
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE.decode()}
Report = Callable[[str, float, str], None]


def backup(store: Store, image: Path) -> Manifest:
    """The image into one snapshot, slot by slot in this thread (zero slots skipped)."""
    size = store.config.chunk_size
    with store.begin_snapshot("bench-vm", "bench-vm", "full") as snap, image.open("rb") as f:
        dm = snap.add_disk("disk0", "disk0", image.stat().st_size)
        slot = 0
        while chunk := f.read(size):
            if any(chunk):
                dm.set(slot, store.put_chunk(chunk))
            else:
                dm.set_zero(slot, 1)
            slot += 1
        return snap.commit()


def restore_rate(store: Path, snapshot: str, work: Path) -> float:
    out = work / "restored.raw"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "restore", snapshot, "--store", store,
         "--to", out, "--format", "raw"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, check=True,
    )  # fmt: skip
    out.unlink()
    return job_summary(proc.stdout + proc.stderr, "restore")[2]


class Receiver:
    """``tessera peer serve`` over a fresh replica in a subprocess (its own CPU)."""

    def __init__(self, origin: Store, path: Path, pki: Pki, encrypted_only: bool = False):
        init_replica(path, origin, encrypted_only).close()
        r = pki.receiver
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli.main", "peer", "serve", "--store", path,
             "--listen", "127.0.0.1:0", "--cert", r.cert, "--key", r.key, "--ca", r.ca],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+)\s*$", line)
        assert m, line
        self.port = int(m.group(1))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=120)


async def push(
    origin: Store, snapshot: str, pki: Pki, port: int, streams: int, delay: float = 0.0
) -> tuple[float, float, float, int]:
    """(job seconds, wire ratio, body ratio, lacked record bytes) of one full push; the
    proxy (and the wire ratio, 0 without it) only when ``delay`` is set, so the loopback
    figure does not pay for a Python proxy in the sender's process."""
    wire = 0.0
    if delay:
        async with Proxy(port, delay=delay) as proxy:
            out = await run_replication(
                store=origin,
                snapshot_id=snapshot,
                target=target(pki, proxy.listen_port, streams=streams),
                full=True,
            )
        wire = proxy.total / out.stats.lacked_bytes
    else:
        out = await run_replication(
            store=origin, snapshot_id=snapshot, target=target(pki, port, streams=streams), full=True
        )
    assert out.record.error is None, out.record.error
    s = out.stats
    return out.seconds, wire, s.body_bytes / s.lacked_bytes, s.lacked_bytes


def run(report: Report) -> None:
    image = CACHE / "fs-1024M.raw" if (CACHE / "fs-1024M.raw").exists() else fs_image(256)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        work = Path(tmp)
        pki = make_pki(work / "pki")
        origin_path = work / "origin"
        Store.init(origin_path, passphrase=PASSPHRASE, kdf=CHEAP_KDF)
        with Store.open(origin_path, passphrase=PASSPHRASE) as origin:
            manifest = backup(origin, image)
        logical = manifest.size
        local = restore_rate(origin_path, manifest.snapshot_id, work)
        report("replication_image_logical", logical / MB, "MB")
        report("restore_local_rate", local, "MB/s")
        with Store.open(origin_path, passphrase=PASSPHRASE, writable=False) as origin:
            figures: dict[str, float] = {}
            for name, streams, delay in (
                ("loopback", 4, 0.0),
                ("loopback_encrypted_only", 4, 0.0),  # CRC only: what decode-verify costs
                ("rtt50_streams4", 4, 0.025),
                ("rtt50_streams1", 1, 0.025),
            ):
                path = work / f"replica-{name}"
                receiver = Receiver(origin, path, pki, encrypted_only="encrypted" in name)
                try:
                    t = time.perf_counter()
                    seconds, wire, body, lacked = asyncio.run(
                        push(origin, manifest.snapshot_id, pki, receiver.port, streams, delay)
                    )
                    wall = time.perf_counter() - t
                finally:
                    receiver.stop()
                figures[name] = logical / seconds / MB
                report(f"replication_{name}_rate", figures[name], "MB/s")
                report(f"replication_{name}_record_rate", lacked / seconds / MB, "MB/s")
                report(f"replication_{name}_wall_seconds", wall, "s")
                if name == "loopback":
                    report("replication_lacked_records", lacked / MB, "MB")
                    report("replication_body_vs_missing", body, "ratio")
                    report("replication_vs_local_restore", figures[name] / local, "ratio")
                if name == "rtt50_streams4":  # TCP bytes both ways, TLS included
                    report("replication_wire_vs_missing", wire, "ratio")
            report(
                "replication_rtt50_streams4_vs_1",
                figures["rtt50_streams4"] / figures["rtt50_streams1"],
                "ratio",
            )
