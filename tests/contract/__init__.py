"""Contract suites: one per seam; every implementation of the seam runs the same tests.

- ``test_cpupool``  the ``CpuPool`` (thread and process pools).
- ``test_source``   ``Source`` / ``BackupSession`` / ``SourceDisk``: the in-memory source,
                    local images (qemu-nbd), and against the lab the oVirt backup-API,
                    snapshot + imageio and snapshot + DataMover flows.
- ``test_target``   a restore's ``make_target`` / ``TargetDisk``: the in-memory target, new
                    local qcow2 and raw images, and against the lab new engine disks written
                    through imageio uploads and through the DataMover.
- ``test_store``    the store protocols (``ChunkReader``, ``ChunkWriter``, ``BackupStore``
                    and the ``SnapshotWriter`` they hand out): ``Store`` with and without
                    encryption, and the in-memory ``tests.memory_store.MemoryStore``.
- ``test_peer``     the replication peer (the ``/peer/v1`` protocol a ``Sender`` speaks):
                    the receiver over a store with and without the data key, and the
                    in-memory ``tests.memory_peer.MemoryPeer``, each served over mutual TLS.

``harness`` holds the source and target implementations, ``stores`` the stores, ``peers``
the peers, one factory each: a new implementation is one more entry in ``SOURCES``,
``TARGETS``, ``STORES`` or ``PEERS`` (with, for a source, whether it keeps checkpoints). A
case an implementation fails today runs as a strict xfail listed in ``harness.KNOWN_GAPS``
with why (none today).
Sources and targets other than the in-memory ones run external programs and are marked
``integration``.
"""
