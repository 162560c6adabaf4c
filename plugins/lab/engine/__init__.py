"""The fake oVirt engine: SSO, the API root and the inventory, served to the real SDK.

Nouns:

- ``Seed``        what a person writes: names of clusters, hosts, storage domains, VMs, disks.
- ``Inventory``   the model built from a seed; records refer to each other by stable UUID5 ids.
- ``Sessions``    the SSO access tokens currently valid.
- ``Activity``    backups, checkpoints, snapshots (``snapshots``: qcow2 overlays), image
                  transfers and events (``backup``): the mutable
                  part, doing real work on the disk images (qemu-img bitmaps, qemu-nbd,
                  ovirt-imageio tickets).
- block volumes  thin disks on the seed's iSCSI/FC domains have a fixed allocation that
                  uploads and DataMover writes cannot pass (``volumes``).
- ``Faults``      the test's fault knobs (``faults``): a FAILED backup, paused transfers,
                  503s, slow responses, and the timing knobs; held by the activity, set on
                  the event loop.
- ``Clock``       the engine's one clock (``clock``): the background work (``monitor``) sleeps
                  on it and every phase age, new disk and SSO token is aged by it; a
                  ``SystemClock`` unless a test gives a ``FakeClock`` it moves itself.
- ``FakeEngine``  owns the inventory, the sessions, the activity and an aiohttp server on
                  127.0.0.1 with TLS.

Invariants: every response body under ``/ovirt-engine/api`` is written by ``ovirtsdk4``'s
writers with ``Content-Type: application/xml``, errors included (``<fault>``); every SSO answer
is JSON; every API request needs a live Bearer token. The inventory is read-only; the activity
changes only through the API (and ``Faults``, which tests set). All state lives on the event
loop (handlers await subprocesses but never block; nothing is shared with threads).
"""

from plugins.lab.engine.backup import Activity
from plugins.lab.engine.clock import Clock, FakeClock, SystemClock
from plugins.lab.engine.faults import Faults
from plugins.lab.engine.server import FakeEngine, make_app
from plugins.lab.engine.sso import Sessions
from plugins.lab.engine.state import DiskSeed, Inventory, Seed, VmSeed, demo_seed, lab_id

__all__ = [
    "Activity",
    "Clock",
    "DiskSeed",
    "FakeClock",
    "FakeEngine",
    "Faults",
    "Inventory",
    "Seed",
    "Sessions",
    "SystemClock",
    "VmSeed",
    "demo_seed",
    "lab_id",
    "make_app",
]
