"""Image transfers: the engine's ticket to read or write one disk (or one snapshot volume)
through ovirt-imageio, shared by every flow that moves disk data over the LAN.

::

    add_transfer(client, obj, disk=… | snapshot=…, backup=…, direction=…)
        POST imagetransfers: raw guest data, ``inactivity_timeout``, ``timeout_policy=cancel``
        (``new_transfer``); returned as created: record its id before waiting
    wait_transfer  ──poll──▶ transferring (then it has its URLs)
    open_image     add, record, wait, ``ImageioDisk.connect(transfer_url, proxy_url, ca=engine
                   CA, keep_alive=extend)``
    finalize_transfer ──poll──▶ finished_success      (success)
    cancel_transfer   ──poll──▶ finished_* or gone     (failure; an upload's disk turns illegal)
    end_transfer      finalize, else cancel             (recovery: leave it ended, however)

``TransferDisk`` is a backup flow's ``SourceDisk`` whose transfer is open only while the job
reads that disk; ``UploadTarget`` is a restore's ``TargetDisk`` over an open upload.

The engine's side (API-NOTES § 5): every transfer is created with ``INACTIVITY_TIMEOUT`` and
``TIMEOUT_POLICY`` so no engine-config default decides them; the engine cancels a transfer
whose imageio ticket sat idle that long, and ``extend`` (``keep_alive``) renews the ticket but
does not reset imageio's idle time, so it keeps a ticket valid, never an idle transfer open.
Phases a client waits through are ``initializing``/``resuming`` (starting) and
``transferring``/``finalizing_success`` (finalizing); every other one (``paused_*``,
``cancelled_*``, ``finalizing_failure``, ``finished_*``) is an end or a stuck state that only
an administrator moves: it is handled at once, never waited on, and raises
``OvirtTransferError`` naming the disk, the phase, the transfer and the engine's last event
about it.

Finalizing and cancelling are idempotent (``idempotent.already_done``): a transfer the engine
already ended (409 ``Phase is …``, 404) is done, so recovery can run them again.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.core.errors import EngineError
from engine.core.extent import Extent
from engine.sources.types import DiskInfo
from engine.util import failpoints
from plugins.ovirt.client import EngineApiError, EngineClient
from plugins.ovirt.events import last_event
from plugins.ovirt.idempotent import Wanted, already_done
from plugins.ovirt.imageio import PIPELINE, ImageioDisk, ImageioReader, ImageioWriter
from plugins.ovirt.polling import Wait

log = structlog.get_logger("tessera.ovirt")

READY_TIMEOUT: Final = 600.0  # a transfer on a busy host can take minutes to start
FINALIZE_TIMEOUT: Final = 600.0  # finalizing an upload checks a qcow2 volume
CANCEL_TIMEOUT: Final = 120.0  # cancelling a transfer must not hang a failed job
# Sent with every transfer (API-NOTES § 5.1), so no engine-config default decides it: the
# engine stops a transfer whose imageio ticket sat idle this long. Each transfer is open only
# while its disk is read or written, so idle time means a stalled job, and a minute is plenty.
INACTIVITY_TIMEOUT: Final = 60
# An idle transfer is cancelled (cancelled_system), not paused holding its disk locked until
# someone cancels it; the job then fails naming the disk and the phase.
TIMEOUT_POLICY: Final = t.ImageTransferTimeoutPolicy.CANCEL
# Phases a client waits through; every other one but transferring is an end or a stuck state
# (paused_*: only a cancel or an administrator's resume moves it), handled at once.
_STARTING: Final = frozenset({"initializing", "resuming", "unknown"})
_FINALIZING: Final = frozenset({"initializing", "transferring", "resuming", "unknown"})


class OvirtTransferError(EngineError):
    template = "{what}: {reason}"


def new_transfer(**fields: Any) -> t.ImageTransfer:
    """The body of a new image transfer: raw guest data, ``INACTIVITY_TIMEOUT`` and
    ``TIMEOUT_POLICY`` always sent, plus ``fields`` (direction, disk / snapshot, backup)."""
    return t.ImageTransfer(
        format=t.DiskFormat.RAW,
        inactivity_timeout=INACTIVITY_TIMEOUT,
        timeout_policy=TIMEOUT_POLICY,
        **fields,
    )


async def add_transfer(client: EngineClient, obj: str, **fields: Any) -> Any:
    """Create a transfer (``new_transfer(**fields)``; ``obj`` names what it moves, for errors)
    and return it as created: not yet ``transferring``, so record its id, then
    ``wait_transfer``. Never retried: a repeated POST would make a second transfer."""
    body = new_transfer(**fields)

    def add(conn: sdk.Connection) -> Any:
        return conn.system_service().image_transfers_service().add(body)

    return await client.call(add, "start image transfer", obj=obj, idempotent=False)


def _service(conn: sdk.Connection, transfer_id: str) -> Any:
    return conn.system_service().image_transfers_service().image_transfer_service(transfer_id)


def _current_phase(conn: sdk.Connection, transfer_id: str) -> str | None:
    """The transfer's phase now; None when the engine no longer has it (404)."""
    try:
        return _phase(_service(conn, transfer_id).get())
    except sdk.NotFoundError:
        return None


def _phase(transfer: Any) -> str:
    return str(transfer.phase.value) if transfer.phase is not None else "unknown"


async def wait_transfer(client: EngineClient, transfer: Any, what: str) -> Any:
    """Poll a new transfer until ``transferring`` (it then has its URLs) and return it.

    Any other phase than initializing/resuming is an end or a stuck state: the transfer is
    cancelled (so nothing is left open and its backup can be finalized; a no-op on one that
    ended) and ``OvirtTransferError`` raised at once naming ``what`` it moves (the disk), the
    phase, the transfer and the engine's last event about it; a timeout cancels and raises
    too."""
    wait = Wait(client.clock, READY_TIMEOUT)
    transfer_id = transfer.id

    def get(conn: sdk.Connection) -> Any:
        return _service(conn, transfer_id).get()

    while (phase := _phase(transfer)) != "transferring":
        stuck = None
        if phase not in _STARTING:
            stuck = f"is {phase}"
        elif wait.expired:
            stuck = f"never started (still {phase})"
        if stuck is not None:
            event = await last_event(client, transfer_id)
            await cancel_transfer(client, transfer_id)
            raise OvirtTransferError(
                what=what,
                reason=f"transfer {transfer_id} {stuck} ({event or 'no event says why'}); "
                "cancelled",
            )
        await wait.pause()
        transfer = await client.call(get, "poll image transfer", obj=f"transfer {transfer_id}")
    return transfer


def keep_alive(client: EngineClient, transfer_id: str) -> Callable[[], Awaitable[None]]:
    """The ``extend`` action of a transfer (it renews the transfer's imageio ticket), for
    ``ImageioDisk.connect(keep_alive=...)``. It does not reset the ticket's idle time (the
    engine's inactivity monitor reads imageio's ``idle_time``, which only requests to imageio
    reset), so it keeps a ticket valid, never an idle transfer open."""

    def extend(conn: sdk.Connection) -> None:
        _service(conn, transfer_id).extend()

    async def call() -> None:
        await client.call(extend, "extend image transfer", obj=f"transfer {transfer_id}")

    return call


async def open_image(
    client: EngineClient,
    add: Callable[[], Awaitable[Any]],
    created: Callable[[str], Awaitable[None]],
    what: str,
) -> ImageioDisk:
    """Create a transfer with ``add`` (``add_transfer`` bound to its fields), tell
    ``created`` its id at once (for the job journal), wait until it is ``transferring`` and
    connect to imageio with the engine CA, the ticket extended until the disk is closed."""
    transfer = await add()
    await created(transfer.id)
    transfer = await wait_transfer(client, transfer, what)
    return await ImageioDisk.connect(
        transfer.transfer_url,
        transfer.proxy_url,
        ca=await client.engine_ca(),
        keep_alive=keep_alive(client, transfer.id),
    )


async def cancel_transfer(client: EngineClient, transfer_id: str) -> bool:
    """Cancel a transfer and wait until it finished (or is gone, or CANCEL_TIMEOUT passed).
    An upload's disk is then illegal and can be deleted. False when it had already ended
    (``idempotent.already_done``: finalized, finished, cancelled or gone)."""

    def cancel(conn: sdk.Connection) -> bool:
        try:
            current = _service(conn, transfer_id).get().phase
            phase = str(current.value) if current else ""
            if phase.startswith(("finished", "finalizing", "cancel")):
                return False
            _service(conn, transfer_id).cancel()
        except sdk.Error as e:
            if already_done(e, Wanted.TRANSFER_ENDED):
                return False
            raise
        return True

    def phase(conn: sdk.Connection) -> str | None:
        return _current_phase(conn, transfer_id)

    what = f"transfer {transfer_id}"
    acted = await client.call(cancel, "cancel image transfer", obj=what)
    wait = Wait(client.clock, CANCEL_TIMEOUT)
    while (current := await client.call(phase, "poll image transfer", obj=what)) is not None:
        if current.startswith("finished") or wait.expired:
            break
        await wait.pause()
    return acted


async def finalize_transfer(
    client: EngineClient,
    transfer_id: str,
    *,
    what: str | None = None,
    failpoint: str | None = None,
) -> bool:
    """Finalize a transfer and wait until the engine says it finished (the engine refuses to
    finalize a backup while any of its transfers is still finalizing).

    Returns False when it already was finalizing, finished, cancelled or gone (the engine's
    409 ``Phase is …`` or 404, ``idempotent.already_done``): it is still waited for. Raises
    ``OvirtTransferError`` at once, naming ``what`` (the disk), the phase and the transfer,
    when it is anywhere but on its way to ``finished_success`` (finalizing_failure,
    finished_failure, cancelled_*, finalizing_cleanup, finished_cleanup, paused_*), whoever
    ended it: a cancelled or paused transfer is never finalized, so waiting is pointless.
    ``failpoint`` (crash tests) is hit after the finalize was sent, with ``.sent``, and once
    the transfer finished, with ``.done``."""

    def finalize(conn: sdk.Connection) -> bool:
        try:
            _service(conn, transfer_id).finalize()
        except sdk.Error as e:
            if already_done(e, Wanted.TRANSFER_ENDED):
                return False
            raise
        return True

    def phase(conn: sdk.Connection) -> str | None:
        return _current_phase(conn, transfer_id)

    name = f"transfer {transfer_id}"

    def failed(reason: str) -> OvirtTransferError:
        return OvirtTransferError(what=what or name, reason=f"{name} {reason}")

    acted = await client.call(finalize, "finalize image transfer", obj=name)
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.sent")
    wait = Wait(client.clock, FINALIZE_TIMEOUT)
    while (current := await client.call(phase, "poll image transfer", obj=name)) is not None:
        if current == "finished_success":
            break
        if current != "finalizing_success" and current not in _FINALIZING:
            raise failed(f"is {current}, not finalized")
        if wait.expired:
            raise failed(f"still {current}")
        await wait.pause()
    if failpoint is not None and acted:
        failpoints.hit(f"{failpoint}.done")
    return acted


async def end_transfer(client: EngineClient, transfer_id: str) -> bool:
    """Recovery: leave the transfer ended, however. Finalize it; one the engine will not
    finalize (``paused_system``) or that did not end ``finished_success`` is cancelled
    (which changes nothing on one that already ended). False when it had already ended."""
    try:
        return await finalize_transfer(client, transfer_id)
    except (EngineApiError, OvirtTransferError) as e:
        log.info("cannot finalize, cancelling", transfer=transfer_id, error=str(e))
        return await cancel_transfer(client, transfer_id)


class TransferDisk:
    """A ``SourceDisk`` read through an image transfer that is open only while the job reads
    the disk: the first call (extents or a reader) opens the transfer (``open_image`` with
    ``add``; its id goes to ``created`` at once, for the journal); ``release()`` (the job read
    the disk) closes the connection and finalizes the transfer. The engine cancels a transfer
    whose ticket sat idle for its ``inactivity_timeout``: opened up front, a second disk's
    transfer would sit idle while the first is read. Used by the backup-API and the snapshot
    flows; ``what`` names the disk in every error ("VM v: backup b: disk d")."""

    def __init__(
        self,
        client: EngineClient,
        info: DiskInfo,
        checkpoint_parent: str | None,
        fallback_reason: str | None,
        *,
        add: Callable[[], Awaitable[Any]],
        created: Callable[[str], Awaitable[None]],
        what: str,
        failpoint: str,
    ) -> None:
        self.info = info
        self.checkpoint_parent = checkpoint_parent
        self.fallback_reason = fallback_reason
        # Reads one reader takes at once (engine.pipeline.disk): pipelined GETs.
        self.reader_pipeline = PIPELINE
        self.transfer_id: str | None = None
        self._client = client
        self._add = add
        self._created = created
        self._what = what
        self._failpoint = failpoint
        self._image: ImageioDisk | None = None
        self._released = False
        self._lock = asyncio.Lock()  # readers start concurrently: one transfer

    async def _record(self, transfer_id: str) -> None:
        self.transfer_id = transfer_id
        await self._created(transfer_id)

    async def image(self) -> ImageioDisk:
        """The connected imageio disk, the transfer made on first use."""
        async with self._lock:
            if self._released:
                raise RuntimeError(f"{self._what}: read after its transfer was released")
            if self._image is None:
                self._image = await open_image(self._client, self._add, self._record, self._what)
            return self._image

    async def extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await (await self.image()).extents("zero", offset, length)

    async def dirty_extents(self, offset: int, length: int) -> Sequence[Extent]:
        return await (await self.image()).extents("dirty", offset, length)

    async def open_reader(self) -> ImageioReader:
        return await (await self.image()).open_reader()

    async def release(self) -> None:
        """Close the imageio connection and finalize the transfer, once (idempotent; later
        calls do nothing, even after a failure: the job journal keeps the transfer for
        recovery). Raises what finalizing raised (``OvirtTransferError`` naming the disk)."""
        async with self._lock:
            if self._released:
                return
            self._released = True
            image, self._image = self._image, None
            if image is not None:
                await image.close()
            if self.transfer_id is not None:
                await finalize_transfer(
                    self._client, self.transfer_id, what=self._what, failpoint=self._failpoint
                )


class UploadTarget:
    """The ``TargetDisk`` of one engine disk while its upload transfer is open (a restore's
    new disk, a standby's existing one). ``fresh``: the disk reads as zeroes, so zero slots
    need no write."""

    def __init__(self, info: DiskInfo, fresh: bool, image: ImageioDisk) -> None:
        self.info = info
        self.fresh = fresh
        self._image = image

    async def open_writer(self) -> ImageioWriter:
        """A new imageio connection; the caller closes it (``restore_disk`` does)."""
        return await self._image.open_writer()
