"""The fake oVirt engine: SSO, the API root, the inventory and the routes that change it,
served to the real SDK.

Nouns:

- ``Seed``        what a person writes: names of clusters, hosts, storage domains, VMs, disks.
- ``Inventory``   the model built from a seed (``state``); records refer to each other by
                  stable UUID5 ids. Only ``restore`` and ``attach_api`` change it: disks
                  and VMs created and deleted, a new disk's status, disks attached and
                  detached.
- ``Sessions``    the SSO access tokens currently valid (``sso``).
- ``Activity``    backups and checkpoints (``backup``; ``hybrid``: snapshot-based backups),
                  VM snapshots (``snapshots``: qcow2 overlays), image transfers
                  (``transfers``) and events: the mutable part, doing real work on the disk
                  images (qemu-img bitmaps, qemu-nbd, ovirt-imageio tickets); ``records``
                  holds its objects.
- block volumes  thin disks on the seed's iSCSI/FC domains have a fixed allocation that
                  uploads and DataMover writes cannot pass (``volumes``).
- ``Devices``     the DataMover VM's local devices (``devices``): an attached disk as a file
                  under a by-id directory, nbdfuse over qemu-nbd.
- ``Faults``      the test's fault knobs (``faults``): a FAILED backup, paused transfers,
                  503s, slow responses, and the timing knobs; held by the activity, set on
                  the event loop.
- ``Clock``       the engine's one clock (``clock``): the background work (``monitor``) sleeps
                  on it and every phase age, new disk and SSO token is aged by it; a
                  ``SystemClock`` unless a test gives a ``FakeClock`` it moves itself.
- ``FakeEngine``  owns the inventory, the sessions, the activity, the devices and an aiohttp
                  server on 127.0.0.1 with TLS (``server``).

Routes: ``sso``, ``pki`` (the engine CA), ``api`` (the API root and the inventory;
``search``: the ``search=`` language), ``inventory_api`` (the other read-only collections),
``backup_api``, ``snapshot_api``, ``attach_api``, ``restore_api``; responses are built by
``render`` (and ``ovf``: a VM's OVF, written and parsed).

Invariants: every response body under ``/ovirt-engine/api`` is written by ``ovirtsdk4``'s
writers with ``Content-Type: application/xml``, errors included (``<fault>``); every SSO answer
is JSON; every API request needs a live Bearer token. The activity changes through the API
and with time (``monitor``, on the engine's clock); ``Faults`` only as tests set them. All
state lives on the event loop (handlers await subprocesses but never block; nothing is shared
with threads).
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
