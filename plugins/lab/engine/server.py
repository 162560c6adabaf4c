"""``FakeEngine``: the inventory, the SSO sessions and the aiohttp server, started together.

    async with FakeEngine(demo_seed(), workdir) as engine:
        conn = ovirtsdk4.Connection(url=engine.url, username=engine.username,
                                    password=engine.password, ca_file=str(engine.ca_file))
        ...   # call the SDK from a worker thread, never on the event loop (API-NOTES § 10.5)

The server listens on 127.0.0.1 only, on a random free port, with TLS from the lab's CA
(``plugins.lab.tls.LabCa``): the one given as ``ca``, else the imageio daemon's, else a new
one. Like a real engine it signs the engine's certificate and imageio's, and the engine
publishes it at ``/ovirt-engine/services/pki-resource`` (``pki``).

Backups and image transfers (``backup_api``) need disk images and an ovirt-imageio daemon::

    async with ImageioDaemon() as daemon, FakeEngine(
        seed, workdir, images={disk_id: Path("disk.qcow2")}, imageio=daemon
    ) as engine:
        ...

``images`` maps disk ids to image files (qcow2 for ``cow`` disks, raw otherwise); the engine
adds and removes checkpoint bitmaps in them and serves them with qemu-nbd, so nothing else may
hold them open meanwhile. Without ``imageio`` every image transfer is refused with a 409.
VM snapshots (``snapshot_api``) rename those images and put qcow2 overlays at their paths
(``snapshots``); the path of a disk's active layer never changes. Disks made by ``POST disks``
(``restore``) get their images in ``workdir/images``. The caller starts and stops
the daemon; ``close()`` stops every qemu-nbd the engine started
and removes its tickets, before the caller stops the daemon.

With ``datamover`` (a VM name) and ``devices_dir``, disks attached to that VM (``attach_api``,
a snapshot's disk or a plain one) appear as files under ``devices_dir/by-id`` named as udev
names them (``devices``; needs root, /dev/fuse and nbdfuse); ``close()`` unplugs them all.

``engine.faults`` (``faults.Faults``) injects failures: a FAILED backup, paused transfers, 503s
and slow responses; the ``faults`` module says what each knob does.

The engine's background work (``monitor``: transfers, backups, snapshots, cold checkpoint
deletes and new disks moving with time, the transfer inactivity monitor) is one task
``start()`` creates and ``close()`` cancels and awaits; an app made by ``make_app`` alone has
none (call ``monitor.tick``).
It runs on the engine's one clock (``clock``), which also ages the SSO tokens: the real one
by default; a test passes a ``FakeClock`` and moves it with ``advance``::

    clock = FakeClock()
    async with FakeEngine(seed, workdir, clock=clock) as engine:
        ...                                           # POST a backup: initializing
        await clock.advance(engine.faults.phase_seconds)  # starting, nobody polling
"""

import asyncio
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web

from plugins.lab.engine import (
    api,
    attach_api,
    backup_api,
    inventory_api,
    monitor,
    pki,
    restore_api,
    snapshot_api,
    snapshots,
    sso,
)
from plugins.lab.engine.backup import Activity
from plugins.lab.engine.clock import Clock, SystemClock
from plugins.lab.engine.devices import Devices
from plugins.lab.engine.faults import FAULTS, Faults
from plugins.lab.engine.state import Inventory, Seed
from plugins.lab.imageio import ImageioDaemon
from plugins.lab.tls import LabCa, TlsFiles

LISTEN_HOST = "127.0.0.1"  # loopback only: the lab's credentials are public
SHUTDOWN_TIMEOUT = 2.0  # seconds to let in-flight requests finish at close
MAX_REQUEST_BODY = 1024 * 1024  # API bodies are small XML; disk data never goes through here


def make_app(
    inventory: Inventory,
    sessions: sso.Sessions,
    epoch: Callable[[], float] = time.time,
    activity: Activity | None = None,
    devices: Devices | None = None,
    datamover: str | None = None,
    ca_pem: bytes | None = None,
) -> web.Application:
    """The aiohttp application alone (no TLS, no socket), for tests that drive it in-process.

    Without ``activity`` the backup routes serve an engine with no images and no imageio.
    With ``devices`` the attachments of the VM named ``datamover`` become local devices.
    With ``ca_pem`` the engine publishes that CA certificate (``pki``). ``epoch`` gives the
    wall time (seconds since the epoch) of the SSO answers' ``exp``."""
    app = web.Application(middlewares=[api.api_middleware], client_max_size=MAX_REQUEST_BODY)
    app[api.INVENTORY] = inventory
    app[api.SESSIONS] = sessions
    activity = activity or Activity(inventory, {}, None)
    app[backup_api.ACTIVITY] = activity
    app[FAULTS] = activity.faults
    if devices is not None and datamover is not None:
        app[attach_api.DEVICES] = devices
        app[attach_api.DATAMOVER] = datamover
    app.add_routes(sso.routes(sessions, epoch))
    if ca_pem is not None:
        app.add_routes(pki.routes(ca_pem))
    app.add_routes(api.routes())
    app.add_routes(backup_api.routes())
    app.add_routes(snapshot_api.routes())
    app.add_routes(attach_api.routes())
    app.add_routes(inventory_api.routes())
    app.add_routes(r for r in restore_api.routes() if r.handler is not restore_api.add_attachment)
    return app


class FakeEngine:
    """A fake oVirt engine on ``https://127.0.0.1:<random port>/ovirt-engine/api``.

    ``workdir`` must exist; the CA certificate and the server key are written there.
    ``clock`` (default: a ``SystemClock``) is the engine's one clock: the background work,
    every phase age and the SSO tokens' ages read it (``clock`` module); ``epoch`` gives the
    wall time of the SSO answers' ``exp``.
    ``sso_idle_timeout`` / ``sso_lifetime`` are the SSO tokens' lifetimes (``sso.Sessions``).
    Use as an async context manager, or call ``start()`` and then ``close()`` (always, even
    when start failed half-way).
    ``url``, ``port`` and ``ca_file`` are valid only after ``start()``.
    """

    def __init__(
        self,
        seed: Seed,
        workdir: Path,
        *,
        clock: Clock | None = None,
        epoch: Callable[[], float] = time.time,
        images: Mapping[str, Path] | None = None,
        imageio: ImageioDaemon | None = None,
        datamover: str | None = None,
        devices_dir: Path | None = None,
        ca: LabCa | None = None,
        sso_idle_timeout: float = sso.IDLE_TIMEOUT,
        sso_lifetime: float = sso.LIFETIME,
    ) -> None:
        # One CA for the engine and imageio, as on a real setup (the engine CA).
        self.ca = ca if ca is not None else imageio.ca if imageio is not None else LabCa()
        self.inventory = Inventory.from_seed(seed)  # raises ConfigError for a bad seed
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.activity = Activity(
            self.inventory,
            dict(images or {}),
            imageio,
            images_dir=workdir / "images",
            clock=self.clock,
        )
        # The fault knobs (``faults`` module): set them on the event loop to misbehave.
        self.faults: Faults = self.activity.faults
        self.sessions = sso.Sessions(
            seed.username,
            seed.password,
            idle_timeout=sso_idle_timeout,
            lifetime=sso_lifetime,
            clock=self.clock.now,
        )
        self.username = seed.username
        self.password = seed.password
        self._workdir = workdir
        # The DataMover's local devices (``devices``): its attached disks as files under
        # ``devices_dir/by-id`` (FUSE mounts in ``devices_dir/mnt``).
        self.devices = (
            Devices(devices_dir / "by-id", devices_dir / "mnt")
            if devices_dir is not None and datamover is not None
            else None
        )
        self._app = make_app(
            self.inventory,
            self.sessions,
            epoch,
            self.activity,
            self.devices,
            datamover,
            ca_pem=self.ca.pem,
        )
        self._runner: web.AppRunner | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._tls: TlsFiles | None = None
        self._port: int | None = None

    async def start(self) -> None:
        """Generate the TLS files, bind a free loopback port and start serving."""
        if self._runner is not None:
            raise RuntimeError("FakeEngine already started")
        await snapshots.seed(self.activity)  # the seed's user snapshots, before any request
        self._tls = self.ca.issue(self._workdir)
        self._monitor = asyncio.create_task(monitor.run(self.activity), name="lab-monitor")
        self._runner = web.AppRunner(
            self._app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((LISTEN_HOST, 0))
            self._port = sock.getsockname()[1]
            site = web.SockSite(self._runner, sock, ssl_context=self._tls.server_context())
            await site.start()
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop serving and the background work, then stop every qemu-nbd and remove every
        ticket; idempotent."""
        runner, self._runner = self._runner, None
        task, self._monitor = self._monitor, None
        try:
            if runner is not None:
                await runner.cleanup()
        finally:
            if task is not None:
                task.cancel()
                await asyncio.wait([task])  # its CancelledError stays its own
            try:
                if self.devices is not None:
                    await self.devices.close()  # before: the devices' qemu-nbd hold images
            finally:
                await self.activity.close()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeEngine not started")
        return self._port

    @property
    def url(self) -> str:
        """The API URL to give ``ovirtsdk4.Connection(url=...)``."""
        return f"https://{LISTEN_HOST}:{self.port}/ovirt-engine/api"

    @property
    def ca_file(self) -> Path:
        if self._tls is None:
            raise RuntimeError("FakeEngine not started")
        return self._tls.ca_file
