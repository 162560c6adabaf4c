"""The application layer: each operation from a typed request to a typed outcome, one path
for every caller.

The command line run in-process (``engine.cli``), the daemon's jobs (``engine.daemon``:
API requests, policies, maintenance schedules, other sites) all call these; none wires a backup or a
restore itself, so a step added here (a limit, a metric, a recovery) reaches every path.

- ``stores``     open a store (``open_store``: passphrase, key file) and ready it for jobs
                 (``open_for_jobs``: a ``JobStore`` — store, journal with unfinished jobs
                 recovered, CPU pool).
- ``requests``   the typed requests of backups and restores and the choices they offer
                 (levels, flows): plain values, importable without the machinery.
- ``backup``     ``VmBackupRequest`` → ``BackupOutcome`` per VM (``backup_vms``), and any
                 ``Source`` list, local images included (``backup_sources``).
- ``plan``       what would happen, nothing done: a policy's selection now
                 (``preview_policy``; ``select``, which the daemon's runs choose with) and a
                 ``VmBackupRequest``'s plan (``plan_backup``: VMs, disks, flow, level, parent).
- ``restore``    ``VmRestoreRequest`` → ``VmRestoreOutcome`` (into the engine:
                 ``plan_vm_restore``, then ``restore_vm``), ``ImageRestoreRequest`` →
                 ``RestoreOutcome`` (local image files: ``restore_images``).
- ``replicate``  ``ReplicateRequest`` → ``ReplicationOutcome`` (one snapshot, or a VM's newest,
                 pushed to a peer).
- ``standby``    ``StandbyRequest`` → ``StandbyOutcome`` (a cold standby refreshed on this
                 site's engine).
- ``maintenance`` ``GcOptions`` / ``VerifyOptions`` → ``GcResult`` / ``VerifyResult``, off the
                 loop; a verify's report lines.
- ``check``    ``CheckRequest`` → ``CheckRecord`` (restore verification: a snapshot's filesystems
                 checked read-only in an appliance, recorded on it); its report lines.
- ``passphrase`` where a store passphrase comes from.
- ``summaries``  the document of a typed outcome (what the API shows and job history keeps).

Below the daemon, above the jobs (the layers contract in ``pyproject.toml``): it imports
``engine.jobs`` and finds plugins through ``engine.sources.registry``; it never prints,
parses arguments or speaks HTTP.
"""
