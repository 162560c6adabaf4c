"""The backup and restore pipelines' defaults that their callers offer as their own
(``tessera backup --readers``, a backup request's readers; ``tessera restore
--disks-at-once``, ``limits.restore_disks``, an image restore request's disks at once).

Apart from ``disk`` (and from ``engine.restore``) so that offering them loads no pipeline:
the command line builds its parser before it runs anything, ``--help`` must not load a
backup's machinery, and a local backup loads no restore module (issue 15).
"""

from typing import Final

DEFAULT_READERS: Final = 4  # connections per disk: hides per-request latency of NBD/HTTP

# Disks of one VM restored at once (``engine.jobs.restore.run_restore``). They share the one
# CpuPool, whose buffers bound memory and decode work however many disks run, so more disks
# add no CPU; what they overlap is the waiting around a disk's data: creating it on the
# engine, opening and finalizing its transfer, request latency, flushes. Two keeps both cores
# busy through one disk's waits; each disk also holds its writer connections, an image
# transfer (or a DataMover attachment) and a qemu-nbd on the far side for as long as it runs.
DEFAULT_DISKS_AT_ONCE: Final = 2
