"""Measure packs on S3 against a running RGW: ``python -m tests.s3.measure`` (starts its own
cluster, or uses S3_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set).

Prints PUT and GET MiB/s of sealed packs through ``S3Packs`` (median of N), record reads by
ranged GET, and the requests that storing 1 GiB of packs took (the counters). The figures in
docs/DESIGN.md §4.1 come from here. Not a test: nothing is asserted about speed."""

import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.core.ids import ChunkId
from engine.store.objects import S3Packs
from engine.store.pack import PackWriter, pack_path
from tests.s3.rgw import Rgw, empty_and_remove_bucket, start_rgw, stop_rgw

MiB = 1024 * 1024


def sealed(directory: Path, size_mib: int, record: int = MiB) -> tuple[str, Path]:
    writer = PackWriter(directory)
    for i in range(size_mib * MiB // record):
        writer.append(ChunkId(secrets.token_bytes(32)), os.urandom(record), i)
    pack = writer.seal()
    return pack.name, pack_path(directory, pack.name)


def main() -> int:
    started = None
    if "S3_ENDPOINT_URL" in os.environ:
        rgw = Rgw(
            Path("."),
            os.environ["S3_ENDPOINT_URL"],
            os.environ["AWS_ACCESS_KEY_ID"],
            os.environ["AWS_SECRET_ACCESS_KEY"],
            os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
    else:
        t = time.perf_counter()
        rgw = started = start_rgw()
        print(f"RGW started in {time.perf_counter() - t:.1f} s")
    admin = rgw.botocore()
    bucket = "measure-" + secrets.token_hex(4)
    admin.create_bucket(Bucket=bucket)
    n = 5
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            packs = S3Packs.open(rgw.endpoint(bucket), prefix="m")
            print(f"open (client + probe): {(time.perf_counter() - t) * 1000:.0f} ms")
            for size in (32, 64):
                files = [sealed(Path(tmp) / f"{size}-{i}", size) for i in range(n)]
                put, get = [], []
                for name, path in files:
                    t = time.perf_counter()
                    packs.put(name, path)
                    put.append(path.stat().st_size / MiB / (time.perf_counter() - t))
                for name, path in files:
                    nbytes = path.stat().st_size
                    t = time.perf_counter()
                    data = packs.read(name, 0, nbytes)
                    get.append(nbytes / MiB / (time.perf_counter() - t))
                    assert len(data) == nbytes
                print(
                    f"{size} MiB packs: PUT {statistics.median(put):.0f} MiB/s "
                    f"({min(put):.0f}-{max(put):.0f}), GET whole {statistics.median(get):.0f} "
                    f"MiB/s ({min(get):.0f}-{max(get):.0f}), n={n}"
                )
                packs.delete([name for name, _ in files])
                for _, path in files:
                    path.unlink()
            # record reads: ~350 KiB records (a 1 MiB chunk at zstd-3 on a filesystem image)
            name, path = sealed(Path(tmp) / "rec", 32, record=350 * 1024)
            packs.put(name, path)
            for length, label in ((350 * 1024, "350 KiB record"), (64, "64-byte footer")):
                times = []
                for i in range(20):
                    t = time.perf_counter()
                    packs.read(name, 16 + i * 350 * 1024, length)
                    times.append(time.perf_counter() - t)
                print(f"ranged GET of a {label}: median {statistics.median(times) * 1000:.1f} ms")
            packs.delete([name])
            # requests to store 1 GiB as 64 MiB packs
            before = packs.counters.snapshot()
            names = []
            for i in range(16):
                name, path = sealed(Path(tmp) / f"g{i}", 64)
                packs.put(name, path)
                names.append(name)
                path.unlink()
            after = packs.counters.snapshot()
            used = {k: after[k].requests - before[k].requests for k in after}
            print(f"requests to store 1 GiB in 64 MiB packs: {used}")
            packs.delete(names)
            packs.close()
    finally:
        empty_and_remove_bucket(admin, bucket)
        admin.close()
        if started is not None:
            t = time.perf_counter()
            stop_rgw(started)
            print(f"RGW stopped in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
