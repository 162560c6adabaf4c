"""The chunk store: global, inline-deduplicated, compressed, encrypted, log-structured.

Nouns (see docs/DESIGN.md §2): a *chunk* is the bytes of one fixed-size *slot* of a disk,
named by its *ChunkId* (keyed BLAKE3-256). A *record* is one encoded chunk; records are
appended to *packs*, which are sealed once and never change. The *index* maps ChunkId →
(pack, offset, length) and can always be rebuilt from pack trailers. A *DiskMap* lists one
ChunkId per slot of a disk; a *manifest* names a snapshot's DiskMaps and is its commit
point; the *catalog* lists snapshots by VM and time.

Modules: ``format`` (every byte layout), ``keys`` (key file, scrypt), ``codec`` (record
encode/decode), ``pack``, ``index``, ``diskmap``, ``manifest``, ``catalog``, ``layout``,
``locks``, ``recovery`` (open = recover), ``snapshot`` (commit order), ``chunk_store``
(the ``Store`` facade).

Invariants:

1. One write order: records → pack sealed (fsync, rename, fsync dir) → index entries durable
   → DiskMaps → manifest (tmp+fsync+rename+fsync dir). No manifest, no snapshot.
2. Open = recover (writer only): temp files deleted, index rows of missing/short packs
   dropped and reported, unindexed sealed packs indexed from their trailers, uncommitted
   snapshot directories deleted, catalog reconciled.
3. ``put`` of a chunk already stored writes nothing. ``get`` returns verified plaintext or
   raises an error naming chunk, pack and offset — never wrong bytes.
4. No per-chunk Python objects for the whole store: the index and catalog are SQLite files;
   DiskMaps are read and written in bounded blocks.

Concurrency and locking. One process opens a store for writing (``WriterLock``, an flock);
within it the ``Store`` is thread-safe and shared by all jobs. Other processes may open it
read-only. Maintenance (issue 7) follows this table; a blank means "runs concurrently":

    ===========  ========  ========  =======  ========  =========  ===========
    holder \\ vs  backup    restore   verify   replicate GC mark    GC sweep
    ===========  ========  ========  =======  ========  =========  ===========
    backup                                                          lease (a)
    restore                                                         snapshot lock (b)
    verify                                                          snapshot lock (b)
    replicate                                                       lease (a)
    GC mark                                                         one GC at a time
    GC sweep     lease (a) lock (b)  lock (b) lease (a) one GC
    ===========  ========  ========  =======  ========  =========  ===========

    (a) a backup/replication registers a lease with its start time; sweep removes only
        chunks unreferenced since before the oldest live lease minus a safety margin.
    (b) snapshots being read are share-locked; prune cannot remove them meanwhile.

Defaults, chosen from ``make bench`` on the 2-core reference machine (figures in the issue
notes and docs/DESIGN.md §9):

- chunk size 1 MiB: a 4 KiB guest write costs 1 MiB instead of PBS's 4 MiB, while per-chunk
  overhead (index row, syscall, pool round trip) stays under ~2 % of the CPU path; 64 KiB
  chunks would make incrementals 2–3× smaller but cost 16× the index rows and DiskMap size.
- zstd level 3 (``codec.DEFAULT_ZSTD_LEVEL``): zstd is ~90 % of the backup CPU cost; level 1
  runs faster but stores ~7–10 % more.
- pack size 64 MiB: tens of MB per pack (Kopia, Borg 2, restic) keeps file counts low; sealing
  costs one fsync per 64 MiB, overlapped with encoding by the background sealer.
- CpuPool: see ``engine.workers``.
"""
