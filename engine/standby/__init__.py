"""Cold standby: a powered-off copy of a VM kept up to date from the snapshots in a store.

Nouns: the *standby* of a VM is a VM on an engine (named ``<vm><name_suffix>``, in the
policy's cluster and storage domain) that stays down; its *state* (``state``) says which
snapshot each of its disks holds; a *refresh* brings it to a newer snapshot writing only
the slots whose ids differ from what the disk holds (``engine.restore`` with a base); a
*full* run creates it from scratch (``VmRestore``-like: new disks, VM from the OVF).

Modules: ``state`` (the per-store, per-VM state file and base DiskMap copies), ``job``
(``refresh_standby`` / ``run_standby_refresh``: mode decision, the journaled job —
``run_restore`` as kind ``standby`` — and the state updates; ``StandbyTargets``, what it
needs of a plugin). The targets come from the ``Hypervisor`` serving the engine section
(``engine.sources.registry.hypervisor``; its ``standby_refresh`` gets the manifest and the
stored OVF, never the store; oVirt's is ``plugins.ovirt.standby``): the engine never
imports plugins.

Rules:

1. First run, or the recorded standby unusable (VM or a disk deleted, a disk illegal, the
   disk set changed, a disk grew, a thin volume on block storage too small for the new
   snapshot): a *full* run, its reason recorded in the state's history and the job. The
   old standby (whatever is left of it) is deleted just before the new VM is created, so a
   full run that fails while uploading leaves the old one as it was.
2. A standby VM that is not down is never written or deleted: the refresh fails naming it
   (someone failed over to it, or is using it).
3. A refresh writes each disk against its base; a disk whose refresh did not finish is
   *dirty* and is written next time without a base (every slot). The state's snapshot
   advances only when every disk was written.
"""
