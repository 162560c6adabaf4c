"""GC bench: mark + sweep throughput and peak RSS on a synthetic store of 2 M chunk ids, and
backup throughput while GC runs as a ratio to the same backup alone (target ≥ 0.8).

The synthetic store is written through the store's own APIs, fast: tiny records (an 8-byte
counter each, encoded by the store's codec) appended with ``PackWriter`` and indexed with
``Store.add_sealed_pack``, 16 Ki records per pack; two snapshots through ``SnapshotWriter``:
"old" references every chunk, "new" references half of the first 7/8 (so those packs are
half live: repacked) and none of the last 1/8 (empty packs: trashed). "old" is pruned and
past its grace, so one GC run expires it, marks 0.875 M ids, condemns and deletes 1.125 M,
trashes 1/8 of the packs and repacks the rest.

The store is built and collected in two fresh subprocesses, and GC's peak is read from
``VmHWM`` (``/proc/self/status``: the high-water mark of the running program image) as well
as ``getrusage``: Linux carries the *parent's* RSS at fork into the child's ``ru_maxrss``
across exec, so a parent that built 2 M ids (or a big pytest process) would hide GC's own
peak under its own.

    python -m tests.bench gc                          # as part of make bench
    python -m tests.bench.gc_bench build STORE N      # the synthetic store
    python -m tests.bench.gc_bench gc STORE           # one GC run, prints a JSON line
"""

import json
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from engine.core.ids import ZERO_ID
from engine.maint.gc import GcOptions, gc
from engine.maint.prune import prune
from engine.maint.retention import Rules
from engine.store.chunk_store import Store
from engine.store.keys import KdfParams
from engine.store.pack import PackWriter
from tests.bench.data import data_chunks, fs_image

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024
PER_PACK = 16 * 1024
PASSPHRASE = b"bench"
KDF = KdfParams(n=2**10, r=8, p=1)
MB = 1e6
Report = Callable[[str, float, str], None]


def referenced_by_new(i: int, n: int) -> bool:
    return i < n * 7 // 8 and i % 2 == 0


def build(path: Path, n: int) -> None:
    """A store of ``n`` chunks as described in the module docstring."""
    Store.init(path, chunk_size=CHUNK, pack_size=64 * 1024 * 1024, passphrase=PASSPHRASE, kdf=KDF)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        ids: list[bytes] = []
        codec = store.codec
        for start in range(0, n, PER_PACK):
            writer = PackWriter(store.layout.packs)
            for i in range(start, min(n, start + PER_PACK)):
                plain = i.to_bytes(8, "big")
                cid = codec.chunk_id(plain)
                writer.append(cid, codec.encode(plain, cid), len(plain))
                ids.append(cid)
            store.add_sealed_pack(writer.seal())
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        for name, day, pick in (
            ("old", 0, lambda i: True),
            ("new", 1, lambda i: referenced_by_new(i, n)),
        ):
            with store.begin_snapshot("vm", "vm", "full", time=t0 + timedelta(days=day)) as snap:
                dm = snap.add_disk("d", name, n * CHUNK)
                for i, cid in enumerate(ids):
                    dm.set(i, cid if pick(i) else ZERO_ID)
                snap.commit()
        del ids
        prune(store, Rules(keep_last=1))


def gc_options() -> GcOptions:
    return GcOptions(now=lambda: datetime.now(UTC) + timedelta(days=8))


def _subprocess(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.gc_bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    return proc.stdout


def build_subprocess(path: Path, n: int) -> None:
    _subprocess("build", str(path), str(n))


def gc_subprocess(path: Path) -> dict[str, float]:
    """One GC run in a fresh process: its result, seconds and peak RSS (MiB)."""
    doc: dict[str, float] = json.loads(_subprocess("gc", str(path)).strip().splitlines()[-1])
    return doc


def vm_hwm_mib() -> float:
    """Peak RSS of this program image (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _gc_main(path: Path) -> None:
    with Store.open(path, passphrase=PASSPHRASE) as store:
        before = vm_hwm_mib()
        t = time.perf_counter()
        result = gc(store, gc_options())
        seconds = time.perf_counter() - t
        pack_bytes = store.index.stats().pack_bytes
    doc = {
        "seconds": seconds,
        "rss_open_mib": before,
        "rss_peak_mib": vm_hwm_mib(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "index_chunks": result.index_chunks,
        "marked": result.marked_chunks,
        "deleted": result.deleted_chunks,
        "packs_repacked": result.packs_repacked,
        "packs_trashed": result.packs_trashed,
        "bytes_copied": result.bytes_copied,
        "bytes_retired": result.bytes_retired,
        "pack_bytes_after": pack_bytes,
    }
    print(json.dumps(doc), flush=True)


def backup_ratio(path: Path, report: Report, mb: int = 160) -> None:
    """Backup MB/s while GC runs in a loop in the same process ÷ the same backup alone."""
    need = mb * 1_000_000 // CHUNK
    chunks = data_chunks(fs_image(256), CHUNK, limit=need)
    chunks = (chunks * (need // len(chunks) + 1))[:need]

    def backup(salt: int) -> float:
        t = time.perf_counter()
        with store.begin_snapshot(f"b{salt}", f"b{salt}", "full") as snap:
            dm = snap.add_disk("d", "d", len(chunks) * CHUNK)
            for slot, c in enumerate(chunks):  # salted: every run writes new chunks
                dm.set(slot, store.put_chunk(salt.to_bytes(8, "big") + c[8:]))
            snap.commit()
        return len(chunks) * CHUNK / MB / (time.perf_counter() - t)

    salt = secrets.randbits(62)  # new chunks on every run, even on a reused store
    with Store.open(path, passphrase=PASSPHRASE) as store:
        alone = backup(salt)
        stop = threading.Event()
        runs = 0

        def collect() -> None:
            nonlocal runs
            while not stop.is_set():
                gc(store, gc_options())
                runs += 1

        thread = threading.Thread(target=collect, name="gc")
        thread.start()
        try:
            during = backup(salt + 1)
        finally:
            stop.set()
            thread.join()
        alone2 = backup(salt + 2)
    base = max(alone, alone2)
    report("gc.backup_alone", base, "MB/s")
    report("gc.backup_during_gc", during, "MB/s")
    report("gc.backup_ratio", during / base, "ratio")
    report("gc.runs_during_backup", runs + 0.0, "runs")


def run(report: Report, n: int = 2_000_000) -> None:
    with TemporaryDirectory(prefix="tessera-gc-bench-", dir=ROOT / "bench-data") as tmp:
        path = Path(tmp) / "store"
        t = time.perf_counter()
        build_subprocess(path, n)
        report("gc.build_store", time.perf_counter() - t, "s")
        doc = gc_subprocess(path)
        report("gc.index_chunks", doc["index_chunks"], "chunks")
        report("gc.seconds", doc["seconds"], "s")
        report("gc.chunks_per_s", doc["index_chunks"] / doc["seconds"], "chunks/s")
        report("gc.repack_mb_per_s", doc["bytes_retired"] / MB / doc["seconds"], "MB/s")
        report("gc.rss_open", doc["rss_open_mib"], "MiB")
        report("gc.rss_peak", doc["rss_peak_mib"], "MiB")
        report("gc.deleted", doc["deleted"], "chunks")
        report("gc.packs_repacked", doc["packs_repacked"], "packs")
        report("gc.packs_trashed", doc["packs_trashed"], "packs")
        backup_ratio(path, report)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        _gc_main(Path(sys.argv[2]))
