"""Sources and targets: the seam between the engine and where disks live.

A *Source* exposes one VM's disks for reading during one backup (``Source.open`` gives a
``BackupSession`` of ``SourceDisk``s); a *target* is a disk being restored (``TargetDisk``,
written through ``DiskWriter`` connections), made by a plugin's factory for each disk of one
restore (``types``). Plugins (``plugins.local``, ``plugins.ovirt``) implement them and offer
typed capabilities (``capabilities``: a ``Hypervisor`` — list VMs, back them up, restore
them, keep standbys — or ``ImageIO`` for local images); the engine finds a plugin in
``registry`` by the capability it needs, never by its name, and only sees these protocols.
Every method that talks to the outside world is async.

Reading model (what the pipeline relies on):

- ``SourceDisk.extents(offset, length)`` says which ranges are known to read as zero (no
  read needed: the slot gets the ZERO id);
- ``SourceDisk.checkpoint_parent`` is None for a full read, or the checkpoint since which
  ``dirty_extents`` lists every byte written (clean slots reuse the parent's ids without
  reading); ``fallback_reason`` says why an asked-for incremental reads fully;
- ``SourceDisk.open_reader()`` gives a new connection; the pipeline opens N of them and
  reads whole slots concurrently with ``readinto`` (straight into CpuPool buffers);
- ``SourceDisk.release()`` says the job is done with the disk, so the source may free what
  serves it before ``BackupSession.close`` (oVirt finalizes the disk's image transfer).

Errors: a read that may succeed when retried raises a ``TransientError``; anything else is
an ``EngineError`` naming the disk and offset.
"""
