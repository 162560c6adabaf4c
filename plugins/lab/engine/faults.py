"""``Faults``: the knobs a test turns to make the fake engine misbehave (API-NOTES § 4.8, § 11.4).

The engine holds one ``Faults`` (``FakeEngine.faults``, also ``Activity.faults``); tests set its
fields on the event loop, between or during runs, and the next requests see them:

- ``fail_backup_of``: VM names. The next backup of such a VM is accepted (201) and then goes
  initializing → failed at its first phase step (``monitor``), with event 10792
  ``VM_BACKUP_FAILED`` (severity error) whose description names the backup id; no
  checkpoint is created. The name is removed
  from the set once used, so only one backup fails.
- missing bitmap: no knob. A test removes a checkpoint's bitmap from a disk image behind the
  engine's back (``qemu-img bitmap --remove``). A backup started after that reports
  ``backup_mode=full`` for the disk (the engine looks for the bitmap when the backup starts,
  as it does for a disk not in the from-checkpoint); a bitmap removed after the backup started
  makes that disk's transfer go paused_system with event 1068, as vdsm's
  ``BitmapDoesNotExist`` does in hybrid/cold mode.
- ``pause_transfers``: every new image transfer goes initializing → paused_system with event
  1068 ``TRANSFER_IMAGE_STOPPED_BY_SYSTEM_FAILED_TO_CREATE_TICKET``, no qemu-nbd and no ticket;
  only cancel ends it.
- ``http_5xx``: the next N authenticated API requests answer 503 with an XML ``<fault>`` before
  reaching their handler (SSO logins and unauthenticated requests are not counted).
- ``slow_ms``: every API request (under ``/ovirt-engine/api``) is answered this many
  milliseconds late (``asyncio.sleep`` in the middleware).
- ``ticket_timeout``: seconds an imageio ticket lives (the engine's
  ``ImageTransferClientTicketValidityInSeconds``, 300) from its creation, its last completed
  request or its last ``extend`` action; imageio then answers 403 on every request. The lab
  renews a ticket only on ``extend`` (``transfers``), so a client must extend transfers that
  stay idle that long.
- ``storage_iops``: slow storage. Every qemu-nbd the engine starts from now on (an image
  transfer's, a DataMover device's) serves at most this many read/write requests per second
  (a qemu ``throttle`` filter); 0 is unthrottled.
- ``volume_chunk``: not a fault but the lab's ``volume_utilization_chunk_mb``: the bytes a
  thin disk created on a block domain without ``initial_size`` may hold (``volumes``; 1 MiB,
  where vdsm's is 1 GiB for disks a hundred times the lab's). Uploads past it fail.
- guest agent missing: no knob, a seed property (``VmSeed.guest_agent=False``).

Timing knobs (the engine's behaviour is the same with any value; only the clock is shorter):

- ``inactivity_timeout``: seconds. When set, every new image transfer gets this inactivity
  timeout instead of the one it asked for (the engine's default when it asks for none is
  60 s), so a test need not wait a minute for the engine's inactivity monitor (``monitor``)
  to cancel an idle transfer. None: the transfer's own value, else 60.
- ``phase_seconds``: how long the engine's background work takes per phase step (``monitor``:
  transfers, backups, snapshots, cold checkpoint deletes move one step per this many seconds
  of the engine's clock, whether anyone polls or not).
- ``disk_seconds``: how long vdsm takes to create a new disk's volume: a disk ``POST disks``
  made is ``locked`` this many seconds of the engine's clock, then ``ok`` (``monitor``,
  ``restore.finish_disk``), whether anyone polls or not.

Seconds of the engine's clock are real ones unless a test gave the engine a ``FakeClock``
(``clock``); ``ticket_timeout``, ``storage_iops`` and ``slow_ms`` are real time always (imageio,
qemu and the client's wait are real programs).
"""

from dataclasses import dataclass, field

from aiohttp import web

from plugins.lab.engine.volumes import LAB_VOLUME_CHUNK


@dataclass(slots=True)
class Faults:
    """The fake engine's fault and timing knobs (module docstring); faults off by default."""

    fail_backup_of: set[str] = field(default_factory=set)  # VM names
    pause_transfers: bool = False
    http_5xx: int = 0  # API requests still to refuse with 503
    slow_ms: int = 0  # delay added to every API response
    ticket_timeout: int = 300  # seconds an imageio ticket lives without an extend
    storage_iops: int = 0  # requests/s every new qemu-nbd export serves; 0: unthrottled
    inactivity_timeout: int | None = None  # overrides every new transfer's; None: its own/60
    phase_seconds: float = 0.25  # seconds per background phase step (``monitor``)
    disk_seconds: float = 0.25  # seconds a new disk stays locked (``restore.finish_disk``)
    volume_chunk: int = LAB_VOLUME_CHUNK  # a new thin block volume without initial_size


FAULTS = web.AppKey("faults", Faults)
