"""Verify bench: ``verify --data`` throughput on a real backup beside the store's own get
rate in the same run (single-thread ``Store.read_chunk`` of every chunk), and per-record
cost on a synthetic store of tiny records.

- real data: the non-zero 1 MiB slots of the cached ext4 image (``data.fs_image``) backed
  up as one snapshot; ``verify.data_mb_per_s`` is plaintext MB/s of a full ``--data`` run
  (read + CRC + AES-GCM + zstd + BLAKE3 re-hash on ``VERIFY_THREADS`` threads, then the
  structure walk), ``verify.get_mb_per_s`` the same chunks read through ``read_chunk`` on
  one thread, and ``verify.vs_get`` their ratio;
- tiny records: ``N_TINY`` 8-byte chunks in packs of 16 Ki records, referenced by one
  snapshot (as in the GC bench, smaller): ``verify.tiny_chunks_per_s`` for ``--data``
  and ``verify.structure_ids_per_s`` for the structure walk alone (one index lookup per
  referenced slot).

    python -m tests.bench verify
"""

import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from engine.maint.verify import VerifyOptions, verify
from engine.store.chunk_store import Store
from engine.store.keys import KdfParams
from engine.store.pack import PackWriter
from tests.bench.data import data_chunks, fs_image

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = b"bench"
KDF = KdfParams(n=2**10, r=8, p=1)
CHUNK = 1024 * 1024
N_TINY = 300_000
PER_PACK = 16 * 1024
MB = 1e6
Report = Callable[[str, float, str], None]


def real_store(path: Path, chunks: list[bytes]) -> None:
    Store.init(path, chunk_size=CHUNK, passphrase=PASSPHRASE, kdf=KDF)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        with store.begin_snapshot("vm", "vm", "full") as snap:
            dm = snap.add_disk("d", "d", len(chunks) * CHUNK)
            for slot, c in enumerate(chunks):
                dm.set(slot, store.put_chunk(c))
            snap.commit()


def tiny_store(path: Path, n: int) -> None:
    Store.init(path, chunk_size=64 * 1024, passphrase=PASSPHRASE, kdf=KDF)
    with Store.open(path, passphrase=PASSPHRASE) as store:
        codec = store.codec
        with store.begin_snapshot("vm", "vm", "full") as snap:
            dm = snap.add_disk("d", "d", n * 64 * 1024)
            for start in range(0, n, PER_PACK):
                writer = PackWriter(store.layout.packs)
                for i in range(start, min(n, start + PER_PACK)):
                    plain = i.to_bytes(8, "big")
                    cid = codec.chunk_id(plain)
                    writer.append(cid, codec.encode(plain, cid), len(plain))
                    dm.set(i, cid)
                store.add_sealed_pack(writer.seal())
            snap.commit()


def run(report: Report) -> None:
    chunks = data_chunks(fs_image(256), CHUNK)
    plain = sum(map(len, chunks))
    with TemporaryDirectory(prefix="tessera-verify-bench-", dir=ROOT / "bench-data") as tmp:
        path = Path(tmp) / "real"
        real_store(path, chunks)
        del chunks
        with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
            ids = [cid for cid, _ in store.index.iter_chunks()]
            t = time.perf_counter()
            for cid in ids:
                store.read_chunk(cid)
            get = plain / MB / (time.perf_counter() - t)
            t = time.perf_counter()
            result = verify(store, VerifyOptions(data=True))
            seconds = time.perf_counter() - t
        assert result.ok, result.findings
        report("verify.data_mb", plain / MB, "MB")
        report("verify.data_mb_per_s", plain / MB / seconds, "MB/s")
        report("verify.data_chunks_per_s", result.chunks_checked / seconds, "chunks/s")
        report("verify.get_mb_per_s", get, "MB/s")
        report("verify.vs_get", plain / MB / seconds / get, "ratio")

        path = Path(tmp) / "tiny"
        tiny_store(path, N_TINY)
        with Store.open(path, passphrase=PASSPHRASE, writable=False) as store:
            t = time.perf_counter()
            result = verify(store, VerifyOptions(data=True))
            seconds = time.perf_counter() - t
            assert result.ok, result.findings
            t = time.perf_counter()
            verify(store)
            structure = time.perf_counter() - t
        report("verify.tiny_chunks", N_TINY, "chunks")
        report("verify.tiny_chunks_per_s", N_TINY / seconds, "chunks/s")
        report("verify.structure_ids_per_s", N_TINY / structure, "ids/s")
