"""CPU workers: the ``CpuPool`` seam through which all chunk CPU work runs off the event loop.

A *CpuPool* hashes (keyed BLAKE3), encodes (zstd, AES-256-GCM, verify) and decodes records
with ``engine.store.codec.Codec``, on workers that are not the event loop; ``ingest`` is a
backup's whole per-chunk path (hash, the caller's known check, encode, the caller's put) in
as few hand-offs as the pool allows — one in the thread pool, where each hop is GIL time the
event loop and the workers share (``make bench`` reports GIL seconds per GiB).

A pool owns a fixed arena of ``capacity`` *buffers* (``ChunkBuffer``), each with room for
one chunk of plaintext (``plain``) and its largest record (``record``); work happens in place
in those buffers, so chunk payloads are not copied between stages nor pickled
(``Codec.decode_into`` decrypts and decompresses straight into ``plain``). ``capacity``
bounds the chunks in flight, and with them the memory, allocated up front: about
``capacity * 2 * chunk_size``.

Implementations (one contract suite, ``tests/contract/test_cpupool.py``, runs both):

- ``ThreadCpuPool``: a thread pool in this process; the arena is a bytearray. blake3,
  zstandard and cryptography release the GIL, so threads run in parallel.
- ``ProcessCpuPool``: ``spawn``ed worker processes; the arena is one shared memory segment
  and only slot indices, lengths and 32-byte ids cross the pipe. A dead worker costs the
  tasks it held (``WorkerError``) and the pool restarts its workers.

Buffer ownership:

1. ``async with pool.buffer() as buf:`` holds one buffer; it waits while all are held. The
   holder owns the buffer until the block exits, then the pool reuses it.
2. A producer fills ``buf.plain`` (``buf.load(data)`` or directly, e.g. ``recv_into``) and
   sets ``buf.length``; ``chunk_id``/``encode`` read ``buf.data``; ``encode`` writes
   ``buf.record`` and returns ``buf.record_data``. For restores, fill ``buf.record`` and set
   ``buf.record_length``; ``decode`` writes ``buf.plain`` and returns ``buf.data``.
3. At most one call runs on a buffer at a time, and nothing else may write it meanwhile.
4. Every view obtained from a buffer (and every view the pool returns) is released when the
   block exits; using it later raises ``ValueError``. Slices cut from those views by the
   caller must not outlive the block (they would pin the arena, and in the process pool make
   ``aclose()`` unable to unmap it). Copy out (``bytes(view)``) what must live longer.
5. If a call is cancelled while a worker still works on its buffer, the buffer goes back to
   the pool only when that worker is done with it.

Raised:

- ``CorruptRecord`` (an ``IntegrityError``) from ``decode``, naming chunk, pack and offset;
  ``encode`` raises it too if verify-after-encode fails. Never retried.
- ``KeyFileError`` from ``decode`` of an encrypted record by a pool without a data key.
- ``WorkerError`` (process pool) when a worker process died under the call; the pool has
  already restarted its workers, so the next call runs normally. Also from ``aclose()`` if
  workers are still busy after its timeout.
- ``ConfigError`` from ``make_cpu_pool`` for an unknown kind, and from ``ProcessCpuPool()``
  when /dev/shm has no room for the arena (checked up front, not found out by a SIGBUS).
- ``ValueError`` for a caller's mistake: lengths outside a buffer, an id that is not 32
  bytes, a record whose plaintext is larger than the pool's chunk size.
- ``RuntimeError`` for a buffer that was given back or is busy, and for any use after
  ``aclose()`` (also raised in tasks still waiting in ``buffer()`` when the pool closes).

``aclose()`` waits for running tasks, stops the workers and releases the arena (the process
pool unlinks its shared memory). Close the pool after every user is done with it.

Default implementation
----------------------
``DEFAULT_POOL_KIND = "thread"``, chosen by ``make bench``, which runs both implementations
over the same chunks of a real ext4 image (1 MiB chunks, zstd 3, AES-256-GCM, 2 cores).
Put of unique chunks into a store, as a ratio to the all-core CPU limit: thread 0.67,
process 0.59 (three runs: thread 0.53–0.67, process 0.44–0.60); get: thread ~650 MB/s,
process ~500 MB/s. Threads win because the three
libraries release the GIL, no slot indexes cross a pipe, and the writer, sealer and event
loop share one address space; processes pay page faults on every fresh compressor output
(sys time ~30 %) in each worker. The process pool stays available (``cpu_pool: process``)
for hosts where Python-level work, not the codecs, would hold the GIL.
"""

from engine.core.errors import ConfigError
from engine.store.keys import StoreKeys
from engine.store.layout import DEFAULT_ZSTD_LEVEL
from engine.workers.pool import ChunkBuffer, CpuPool
from engine.workers.process_pool import ProcessCpuPool
from engine.workers.thread_pool import ThreadCpuPool

POOL_KINDS = ("thread", "process")
DEFAULT_POOL_KIND = "thread"  # see "Default implementation" above

__all__ = [
    "DEFAULT_POOL_KIND",
    "POOL_KINDS",
    "ChunkBuffer",
    "CpuPool",
    "ProcessCpuPool",
    "ThreadCpuPool",
    "make_cpu_pool",
]


def make_cpu_pool(
    keys: StoreKeys,
    chunk_size: int,
    *,
    kind: str = DEFAULT_POOL_KIND,
    workers: int | None = None,
    capacity: int | None = None,
    level: int = DEFAULT_ZSTD_LEVEL,
) -> CpuPool:
    """Build a pool of ``kind`` (one of ``POOL_KINDS``); ConfigError for any other kind.

    ``workers`` defaults to ``os.cpu_count()``, ``capacity`` to ``max(8, 4 * workers)``.
    The caller must ``await pool.aclose()``.
    """
    if kind == "thread":
        return ThreadCpuPool(keys, chunk_size, workers=workers, capacity=capacity, level=level)
    if kind == "process":
        return ProcessCpuPool(keys, chunk_size, workers=workers, capacity=capacity, level=level)
    raise ConfigError(message=f"unknown CPU pool kind {kind!r}; expected one of {POOL_KINDS}")
