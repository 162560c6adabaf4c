"""Tessera: agentless backup of oVirt/RHV VMs into a deduplicating, encrypted chunk store.

The package tree is the data flow (see ``docs/DESIGN.md``):

- ``engine.core``     value types (ChunkId, the ZERO id), errors, units — imports nothing of ours.
- ``engine.util``     small mechanisms: atomic files, failpoints for crash tests.
- ``engine.store``    the log-structured chunk store: record/pack/DiskMap formats, index,
                      manifests, catalog. Knows nothing of HTTP, oVirt, jobs or worker pools.
- ``engine.workers``  the ``CpuPool`` seam: hashing, compression, encryption off the event loop.
- ``engine.daemon``   the ``tessera`` command line.

Layers import downward only (daemon → workers → store → util → core); ``make lint`` enforces
it with import-linter. ``plugins/`` hold sources and targets and are never imported by the
engine.
"""
