"""Contract suites: one per seam; every implementation of the seam runs the same tests.

- ``test_cpupool``  the ``CpuPool`` (thread and process pools).
- ``test_source``   ``Source`` / ``BackupSession`` / ``SourceDisk``: the in-memory source,
                    local images (qemu-nbd), and against the lab the oVirt backup-API,
                    snapshot + imageio and snapshot + DataMover flows.
- ``test_target``   a restore's ``make_target`` / ``TargetDisk``: the in-memory target, new
                    local qcow2 and raw images, and against the lab new engine disks written
                    through imageio uploads and through the DataMover.

``harness`` holds the implementations, one factory each: a new implementation is one more
entry in ``SOURCES`` or ``TARGETS`` (with, for a source, whether it keeps checkpoints). A
case an implementation fails today runs as a strict xfail listed in ``KNOWN_GAPS`` with why.
Implementations other than the in-memory ones are marked ``integration``.
"""
