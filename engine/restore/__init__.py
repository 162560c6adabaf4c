"""Restore: write a snapshot's disks back out, from the store into a Target.

Nouns: a *window* is a run of consecutive slots planned together (``planner.WINDOW_SLOTS``);
a *plan* (``planner.WindowPlan``) lists a window's zero runs and the records to read, grouped
by pack and ascending inside each pack, every distinct chunk once with all the slots it
fills; a *writer* is one connection to the target disk (``DiskWriter``).

A *base* is the DiskMap of the ids the target already holds (a standby disk refreshed from
its previous snapshot): a slot whose id equals the base's is *unchanged*, neither read nor
written, so only the slots that differ travel.

Modules: ``planner`` (pure: windows of DiskMap ids → plans), ``disk`` (``restore_disk``:
plans → store reads → CpuPool decode → concurrent target writes → flush; the store typed as
``engine.store.protocols.ChunkReader``), ``nbd_target`` (``NbdTargetDisk``: a target over a
running NBD export, what a local image and a device attached to the DataMover share; used
by ``plugins.local`` and ``plugins.ovirt``), ``export`` (``SnapshotExport``: one disk of a
snapshot as an NBD backend) with ``overlay`` (its copy-on-write layer), ``files``
(``GuestTree``: the guest filesystems of a snapshot read in a libguestfs appliance, driven
through the helper process ``appliance``; ``tree`` holds what the two exchange), ``check``
(restore verification: every filesystem of a snapshot checked by its own checker in no-write
mode inside the appliance — ``fsck``, run by the helper — and expected paths looked up; the
verdict, a ``CheckRecord``, kept beside the snapshot by ``record``).

Invariants:

1. Every slot of the disk is written exactly once, except that on a fresh (new, sparse)
   target a zero slot is not written at all, and with a base an unchanged slot is not
   written; data never reaches the target unverified (the CpuPool's decode checks CRC,
   AEAD tag and the keyed id of the plaintext).
2. Memory is bounded by one window's plan and the pool's capacity, whatever the disk size.
3. Integrity errors (``CorruptRecord``, ``ChunkMissing``) reach the caller as themselves,
   naming chunk, pack and offset (or disk and slot); a restore never retries them.
"""
