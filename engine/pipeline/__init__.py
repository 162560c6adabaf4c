"""The backup pipeline: read one disk into the store, slot by slot.

::

    planner ──(extent windows, just ahead)──▶ slot decisions ──READ slots──▶ bounded queue
       │ ZERO: DiskMap ← ZERO id (never read)                                 │
       │ CLEAN since parent: DiskMap ← parent's id (never read)              ▼
       └──────────────────────────────────────────── N readers (own connection each)
                                                      readinto a CpuPool buffer
                                                        │ filled buffers
                                                        ▼
                                                      processors: hash → all zero? ZERO id
                                                      → known? skip : encode
                                                      → store.put (writer thread)
                                                      → DiskMap[slot] = id

A source whose readers take pipelined reads (``reader_pipeline``, imageio: 2) gets that many
lanes per reader, each with its own buffer, on the reader's one connection.

Memory is bounded by the queue and the pool's buffers, whatever the disk size; DiskMap
slots complete out of order (they are positional). A clean slot whose parent id verify
marked bad (``bad_chunk_ids``) is read again, so the backup heals it. ``slots`` holds the
pure slot classification, ``disk`` the concurrent part (``backup_disk``, which the backup
job calls per disk, typed against ``engine.store.protocols.ChunkWriter``), ``defaults`` the
values callers offer as their own (readers per disk), importable without the pipeline.

A buffer goes back to the pool only when nothing reads it: a cancelled processor waits for
its ``store.put`` (which runs on in the writer thread, reading the record) before it lets go.
"""
