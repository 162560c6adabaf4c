"""The chunk store: global, inline-deduplicated, compressed, encrypted, log-structured.

Nouns (see docs/DESIGN.md §2): a *chunk* is the bytes of one fixed-size *slot* of a disk,
named by its *ChunkId* (keyed BLAKE3-256). A *record* is one encoded chunk; records are
appended to *packs*, which are sealed once and never change. The *index* maps ChunkId →
(pack, offset, length) and can always be rebuilt from the packs: from their trailers, or,
where a trailer is damaged, by scanning the self-describing records (``scan``). A *DiskMap*
lists one ChunkId per slot of a disk; a *manifest* names a snapshot's DiskMaps and is its
commit point; the *catalog* lists snapshots by VM and time.

Modules: ``format`` (every byte layout), ``keys`` (key file, scrypt), ``codec`` (record
encode/decode), ``pack``, ``index``, ``diskmap``, ``manifest``, ``catalog``, ``layout``,
``locks``, ``leases`` (sessions GC must respect), ``recovery`` (open = recover), ``scan``
(records of a pack whose trailer is damaged), ``dbfiles`` (missing or damaged SQLite files,
SQLite and OS errors as ``StoreError``), ``failure`` (write failures as ``StoreWriteError``
with the errno and free space), ``damage`` (the damage marks verify writes beside a
snapshot; the store drops healed chunks from them), ``snapshot`` (commit order), ``replica``
(a replicated snapshot's commit order), ``chunk_store`` (the ``Store`` facade),
``protocols`` (the ``ChunkReader``, ``ChunkWriter`` and ``BackupStore`` its users type
against; ``Store`` fits them), ``objects`` (``PackObjects``: where sealed packs live, a
directory or an S3 bucket through ``engine.io.s3``, create-only puts, ranged reads, batched
deletes, request counters, a bucket probed at open), ``remote`` (a store whose sealed packs
live in an S3 bucket: ``packs/`` as their bounded cache, upload intents, the bucket's side
of recovery; docs/DESIGN.md §4.1), ``retention`` (object lock in such a bucket: lock dates
by generation, renewal at commit). The checker that reads through the store
(``engine.maint.check``) and the rest of maintenance sit above this package; nothing here
imports them.

Invariants:

1. One write order: records → pack sealed (fsync, rename, fsync dir) → [in a bucket: upload
   intent durable → PUT create-only] → index entries durable (and the intent cleared) →
   DiskMaps → manifest (tmp+fsync+rename+fsync dir). No manifest, no snapshot; every
   indexed pack is where packs live.
2. Open = recover (writer only): a missing or damaged index.db / catalog.db rebuilt (a
   damaged one moved aside, never deleted), temp files deleted, index rows of missing/short
   packs dropped and reported, unindexed sealed packs indexed from their trailers — or, with
   a damaged trailer, from their intact records (reported once; ``repair`` re-seals them) —
   uncommitted snapshot directories deleted, catalog reconciled. A read-only open with a
   missing or damaged index or catalog works on temporary copies and says so.
3. ``put`` of a chunk already stored writes nothing. ``read_chunk`` returns verified
   plaintext, and ``get_record`` a record whose decode verifies it, or they raise an error
   naming chunk, pack and offset — never wrong bytes.
4. No per-chunk Python objects for the whole store: the index and catalog are SQLite files;
   DiskMaps are read and written in bounded blocks.
5. A failed write poisons, never corrupts: a pack whose write, fsync, rename or index commit
   fails is abandoned (never appended to or indexed again; its pending records stop
   deduplicating), snapshots begun before the failure refuse to commit
   (``write_token``/``flush(since=…)``), and the next put opens a new pack — the store stays
   usable in a long-running process. Failures surface as ``StoreWriteError`` naming the
   store, the object and the errno (``failure``).

Concurrency and locking. One process opens a store for writing (``WriterLock``, an flock);
within it the ``Store`` is thread-safe and shared by all jobs. Other processes may open it
read-only. Maintenance (issue 7) follows this table; a blank means "runs concurrently":

    ===========  ========  ========  =======  ========  =========  ===========
    holder \\ vs  backup    restore   verify   replicate GC mark    GC sweep
    ===========  ========  ========  =======  ========  =========  ===========
    backup                                                          lease (a)
    restore                                                         snapshot lock (b)
    verify                                                          snapshot lock (b)
    replicate                                                       lease (a) lock (b)
    GC mark                                                         one GC at a time
    GC sweep     lease (a) lock (b)  lock (b) lease (a) one GC
    ===========  ========  ========  =======  ========  =========  ===========

    (a) a backup/replication holds a lease (its start stamp); GC deletes a chunk only if
        it was condemned before every lease live during the GC began (protocol below).
    (b) snapshots being read are share-locked; prune cannot remove them meanwhile. A reader
        whose pack GC retired meanwhile looks the chunk up again (``Store.get_record``).
        Replication: the receiver's session holds a lease from its opening (before its
        first "which ids do you lack" answer) to the manifest commit (``replica``); the
        sender share-locks the snapshot it sends and the one it diffs against.

Where GC runs: in the process that holds the writer lock (the daemon, or ``tessera gc``
when no daemon or backup holds it), so every session that can reference chunks runs in the
same process and its lease is in the in-memory ``LeaseRegistry`` (``leases``); leases need
no durability because a dead process's sessions are dead and open = recover deletes their
uncommitted snapshots. ``SnapshotWriter`` takes a lease from creation to commit/abort;
``Store.lease`` is for sessions without one (replication receivers).

GC protocol (``engine.maint.gc``; the danger is a session that finds a chunk with
``has``/``put`` just before GC deletes it, then commits a snapshot referencing it):

1. GC starts a *lease watch*: the oldest start of every lease live at any moment of the run.
2. Mark: ids of every committed manifest (and of removed snapshots still in their grace
   period) go into an on-disk SQLite table — bounded RAM.
3. Unmarked live index rows are *condemned* in short transactions: ``condemned = -1``
   committed first, then stamped with ``LeaseClock.now()``. From the first commit on,
   ``has``/``put`` treat the chunk as absent, so writers store it again (the new location
   replaces the row and revives it: ``add_pack`` upserts over condemned rows);
   ``get_record`` still reads it. Marked rows that were condemned are absolved
   (``condemned = 0``).
4. A row is deleted only if unmarked and condemned at a stamp older than the watch's oldest
   lease (``DELETE … WHERE condemned BETWEEN 1 AND cutoff``: a revived row is never hit).
   Any session that found the chunk before it was condemned began before the stamp, was
   live during the run (or committed before the mark, so the mark saw it), so it holds the
   deletion back; a session begun after the stamp could not find it.
5. Packs: no rows → linked into ``trash/`` and forgotten; sparse → live records copied into
   a new sealed pack, then link into trash → one index transaction (rows move) → unlink.
   In a bucket: the new pack is uploaded (intent first) before that transaction, the trash
   entry is a marker ``<t>-<name>.remote`` instead of a link, "unlink" drops the cached copy,
   and emptying the trash deletes the objects (``DeleteObjects`` batches) before the markers;
   with object lock a marker also holds the pack's date and stays until it is past and the
   bucket has let the delete through.
   An object is never deleted while indexed or named by an upload intent of a live writer.
   Open = recover finishes or undoes a half-retired pack; the trash is emptied after the
   grace period (the undo window against a mistaken or malicious prune).

A session must hold its lease before it references chunks without asking ``has`` (an
incremental copies its parent's DiskMap ids): the backup job reads the parent's manifest just
before ``begin_snapshot``, which is safe because a parent is its VM's newest snapshot (prune
never removes it) or within the removed-snapshot grace period (still marked).

No touched-id set and no commit-time re-check are needed: condemnation makes a chunk
invisible to deduplication before anything is deleted, and the stamp orders it after every
session that could have seen it.

Defaults, chosen from ``make bench`` on the 2-core reference machine (real ext4 image, 780 MB
of data; single figures move ±20 % run to run on this shared machine, ratios less):

- chunk size 1 MiB. Store put of unique chunks through the thread pool: 256 KiB chunks
  106 MB/s, 1 MiB 183 MB/s, 4 MiB 150 MB/s (earlier runs: 126 / 170 / 168) — 1 MiB reaches
  the plateau (per-chunk costs — index row, syscalls, pool round trips — are amortised),
  while 4 MiB only makes a 4 KiB guest write cost 4 MiB of incremental (PBS's choice). 64 KiB
  chunks would make incrementals 2–3× smaller (docs/DESIGN.md §9) at 16× the index rows and a
  clear throughput loss.
- zstd level 3 (``layout.DEFAULT_ZSTD_LEVEL``), chosen per store at ``store init``
  (``--zstd-level``, -7..19). On the bench's filesystem image (one core, 2026-12-07): level
  -3 stores 47.5 % of the plaintext at 676 MB/s, -1 42.1 % at 608, 1 37.9 % at 590, 2 35.8 %
  at 495, 3 34.4 % at 385. Level 3 is the default because it is what keeps the stored size
  within 2 % of borg's zstd-3 (level 2 already stores 4 % more, level 1 10 %); zstd is ~85 %
  of the backup CPU cost, so the level is the speed/size dial a store's owner may turn.
- pack size 64 MiB: tens of MB per pack (Kopia, Borg 2, restic) keeps file counts low;
  sealing costs one fsync per 64 MiB (~35 ms here), overlapped with encoding by the
  background sealer.
- CpuPool: threads (``engine.workers``): put reaches 0.67 of the all-core CPU limit (hash +
  zstd + AES measured single-core × 2) vs 0.59 for processes; pack writes, SQLite and the
  event loop share the same two cores.
- verify-after-encode on one record in 8 (``codec.VERIFY_EVERY``): verifying every record
  costs ~37 % more CPU for the backup; the sample catches a systematic encoder fault within
  a few dozen records, and the ``verify`` job checks every record (the codec's docstring
  gives the figures and the reasoning).
"""
