"""Plugins: where disks are read from and restored to.

Each plugin package exports ``PLUGIN``, an ``engine.sources.registry.Plugin`` (its name, its
``recover`` step for what a killed job of it left, and the capabilities it provides), found
through the ``tessera.plugins`` entry points in ``pyproject.toml``; the engine never imports
a plugin, it asks the registry for a capability (``engine.sources.capabilities``).

- ``plugins.ovirt``  an oVirt engine (a ``Hypervisor``): list VMs, back them up through the
                     incremental-backup API, snapshot + imageio, or snapshot disks attached
                     to the DataMover; restore them; keep cold standbys.
- ``plugins.local``  qcow2/raw images through qemu-nbd (``ImageIO``).
- ``plugins.lab``    the embedded lab the demo runs (fake engine, real imageio, generated
                     disks); no capability, only its commands (``tessera lab up|show|down``).

Import contracts (``pyproject.toml``): no plugin imports another; ``engine``,
``plugins.local`` and ``plugins.ovirt`` never import the lab; a plugin imports none of the
engine's application, jobs, daemon, pipeline, replication, maintenance, scheduler, worker
or observability packages (what plugins share lives in ``engine.io`` and
``engine.restore.nbd_target``).
"""
