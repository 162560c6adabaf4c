"""Sources and targets: where disks are read from and restored to.

Each plugin implements the Source / Target protocols of ``engine.sources`` (arriving with the
pipeline issue) and registers itself; the engine never imports a plugin directly. Planned:
``plugins.local`` (qcow2/raw images via qemu-nbd), ``plugins.ovirt`` (engine API + imageio,
LAN based and LAN free) and ``plugins.lab`` (the embedded fake engine the demo runs).
"""
