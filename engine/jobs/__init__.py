"""Jobs: one run of backup or restore, on a state table, journaled so that a killed process's
work is finished or undone. Replication (``engine.replication.job``, kind ``replicate``) and
standby refreshes (``engine.standby``, kind ``standby``, through ``run_restore``) run on the
same driver and journal, each kind with its table in ``states.TABLES``.

Every job is a table-driven state machine (``states``: one module owns the tables; illegal
transitions raise). The ``driver`` persists the new state in the ``journal`` *before* acting
on it, so a process killed at any instant leaves a record saying what it was doing and what
it had created (``resources``: exports, bitmaps, target files). At the next start,
``recovery.recover_unfinished`` hands each unfinished record to its plugin's ``recover``
(the record names the plugin), which finishes (the snapshot was committed) or cleans up (it
was not). Every job ends with a summary on its record.

Modules: ``states``, ``driver`` (``JobDriver``), ``journal`` (``Journal``, ``JobRecord``),
``recovery``, ``backup`` (``run_backup`` → ``BackupOutcome``: one VM from a Source into the
store), ``restore`` (``run_restore`` → ``RestoreOutcome``: a snapshot's disks into targets;
``read_vm_config``: the stored OVF), ``history`` (``JobHistory``: every finished daemon job
as a row of ``<store>/history.db``, read back at the next start; a job its daemon was
running when it died becomes an interrupted row there).

The journal writes off the event loop, on one writer thread per journal, in order; callers
await a save before acting on what it records (``journal``).
"""
