"""Tessera: agentless backup of oVirt/RHV VMs into a deduplicating, encrypted chunk store.

The package tree is the data flow (see ``docs/DESIGN.md``); the layers, top down:

- ``engine.cli``          the ``tessera`` command line; ``tessera run`` composes the service
                          and its API.
- ``engine.api``          the daemon's HTTP API: routes, request models, OpenAPI document.
- ``engine.daemon``       the service: job manager, scheduled policies and maintenance, other
                          sites.
- ``engine.app``          each operation from a typed request to a typed outcome (backup,
                          restore, opening a store), for the command line and the daemon alike.
- ``engine.replication``  snapshots pushed to (and received from) other sites;
  ``engine.standby``      powered-off copies of VMs kept up to date from the snapshots.
- ``engine.jobs``         state tables, driver, journal, crash recovery, job history.
- ``engine.pipeline``     backup of one disk; ``engine.restore``: restore of one disk;
  ``engine.config``       YAML → frozen typed models; ``engine.maint``: retention, prune,
                          space accounting, GC, check, verify, repair.
- ``engine.sched``        calendar expressions, the scheduler, level rules.
- ``engine.sources``      the seam to plugins: Source / Target protocols, capabilities, registry.
- ``engine.workers``      the ``CpuPool`` seam: hashing, compression, encryption off the loop.
- ``engine.store``        the log-structured chunk store: record/pack/DiskMap formats, index,
                          manifests, catalog. Knows nothing of HTTP, oVirt, jobs or worker pools.
- ``engine.io``           the NBD client, qemu-img / qemu-nbd processes, journaled NBD exports.
- ``engine.util``         small mechanisms (atomic files, failpoints, retry, limits, tasks);
  ``engine.obs``          logging, syslog forwarding, e-mail, metrics.
- ``engine.core``         value types (ChunkId, the ZERO id, Extent), errors, units — imports
                          nothing of ours.

Layers import downward only; packages named on one line are independent of each other.
``make lint`` enforces it with import-linter (the contracts in ``pyproject.toml``). ``plugins/``
hold sources and targets; the engine never imports them, it finds them through entry points
(``engine.sources.registry``).
"""
