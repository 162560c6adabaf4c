"""The backup pipeline: read one disk into the store, slot by slot.

::

    planner ──(extent windows, just ahead)──▶ slot decisions ──READ slots──▶ bounded queue
       │ ZERO: DiskMap ← ZERO id (never read)                                 │
       │ CLEAN since parent: DiskMap ← parent's id (never read)              ▼
       └──────────────────────────────────────────── N readers (own connection each)
                                                      readinto CpuPool buffer
                                                      → hash → known? skip : encode
                                                      → store.put (writer thread)
                                                      → DiskMap[slot] = id

Memory is bounded by the queue and the pool's buffers, whatever the disk size; DiskMap
slots complete out of order (they are positional). ``slots`` holds the pure slot
classification, ``disk`` the concurrent part.

A buffer goes back to the pool only when nothing reads it: a cancelled processor waits for
its ``store.put`` (which runs on in the writer thread, reading the record) before it lets go.
"""
