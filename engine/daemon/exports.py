"""NBD exports as daemon jobs (``POST /v1/exports``; ``tessera export --config`` when the
daemon runs).

::

    start(ctx, ExportAsked) ─► resolve (snapshot, disk) ─► job of kind ``export`` (open-ended)
        body: snapshot share-locked (prune skips it)
              engine.app.export.serve_export on <serve.run_dir>/exports/<job>.sock (0600,
              the directory 0700), overlay <serve.state_dir>/overlays/<job>.cow when writable
              ─► ready: ``start`` returns once clients can connect
        ends: cancel (``POST /v1/jobs/{id}/cancel``, ``tessera cancel``, the daemon stopping)
              → cancelled; ``ttl_seconds`` over → succeeded. The socket and the overlay are
              removed either way; the summary counts connections and bytes.

The job's ``vm`` is ``snapshot:<id>`` (it is no backup of that VM: no last-success gauge);
its ``params`` carry what a client needs (socket, NBD URI, disk, expiry), so ``GET
/v1/jobs/{id}`` and ``GET /v1/exports`` show the same document. Any number of exports may
run, also of one snapshot; they hold no ``vms`` unit (``JobManager`` open-ended jobs).
"""

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from engine.app.export import ExportTarget, resolve_export, serve_export, uris
from engine.app.stores import JobStore
from engine.config.models import Config
from engine.core.errors import ConfigError, EngineError
from engine.daemon.context import DaemonContext
from engine.daemon.jobs import JobView
from engine.io.nbd.serve import Listener, ServerStats
from engine.io.qemu import MAX_SOCKET_PATH
from engine.jobs.journal import new_job_id

log = structlog.get_logger("tessera.exports")

KIND: Final = "export"
JOB_ID_LENGTH: Final = len(new_job_id())  # a socket is named after its job
# How long ``start`` waits for the export to listen (a DiskMap opened, a socket bound).
READY_TIMEOUT: Final = 60.0


class ExportFailed(EngineError):
    """The export job ended before it could serve (the API answers 500 with the reason)."""

    template = "export of snapshot {snapshot}: {reason}"


@dataclass(frozen=True)
class ExportAsked:
    snapshot: str
    disk: str | None = None
    store: str | None = None
    writable: bool = False
    ttl: timedelta | None = None


def socket_dir(config: Config) -> Path:
    return config.serve.sockets(config.api.socket)


def check_socket_dir(directory: Path) -> None:
    """ConfigError unless an export's socket in ``directory`` fits a unix socket address
    (``sockaddr_un``: 107 bytes and a NUL on Linux): a client could not reach a longer one."""
    longest = directory / f"{'0' * JOB_ID_LENGTH}.sock"
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        raise ConfigError(
            message=f"export sockets in {directory} would have paths of "
            f"{len(os.fsencode(longest))} bytes; a unix socket's holds at most "
            f"{MAX_SOCKET_PATH}: set serve.run_dir to a shorter directory"
        )


def overlay_dir(config: Config) -> Path:
    return config.serve.state(config.scheduler.state_file) / "overlays"


def private_dir(path: Path) -> Path:
    """``path`` made (parents too) and set 0700: only the daemon's user enters it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def sweep(config: Config) -> list[Path]:
    """What a killed daemon's exports and browsing sessions left (sockets, overlays, download
    directories), removed at start, before any job can make new ones (blocking)."""
    state = config.serve.state(config.scheduler.state_file)
    found = [
        *_entries(socket_dir(config), "*.sock"),
        *_entries(overlay_dir(config), "*.cow*"),
        *_entries(state / "files", "*"),
    ]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


def _entries(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern)) if directory.is_dir() else []


def doc(view: JobView) -> dict[str, Any]:
    """An export job as the API shows it under ``/v1/exports``."""
    return {"job": view.job_id, "state": view.state} | {
        k: view.params.get(k)
        for k in ("store", "snapshot", "vm", "disk", "writable", "socket", "uri", "expires")
    }


async def start(ctx: DaemonContext, asked: ExportAsked) -> JobView:
    """Submit the export and return its job once it serves. ConfigError or SnapshotNotFound
    (4xx) for what the request named wrong, before any job; ``ExportFailed`` when the job
    ended before serving (its error says why)."""
    check_socket_dir(socket_dir(ctx.config))
    handle = ctx.store(asked.store)
    target = await asyncio.to_thread(resolve_export, handle.store, asked.snapshot, asked.disk)
    sockets = await asyncio.to_thread(private_dir, socket_dir(ctx.config))
    overlays = overlay_dir(ctx.config)
    ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    disk = target.disk
    params: dict[str, Any] = {"store": handle.name, "snapshot": target.snapshot_id}
    params |= {"vm": target.manifest.vm_name, "writable": asked.writable}
    params |= {"disk": {"id": disk.disk_id, "name": disk.name, "size": disk.size}}
    if asked.ttl is not None:
        params["expires"] = (datetime.now(UTC) + asked.ttl).isoformat(timespec="seconds")

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        overlay = None
        if asked.writable:
            overlay = await asyncio.to_thread(private_dir, overlays) / f"{view.job_id}.cow"
        return await _serve(
            view, handle, target, sockets / f"{view.job_id}.sock", overlay, asked.ttl, ready
        )

    view = ctx.jobs.submit(
        KIND, f"snapshot:{target.snapshot_id}", body, params=params, open_ended=True
    )

    def never_served(_: object) -> None:
        if not ready.done():
            reason = view.error or "it ended"
            ready.set_exception(ExportFailed(snapshot=target.snapshot_id, reason=reason))

    if view.task is not None:  # cancelled before its body ran: nothing else answers ``ready``
        view.task.add_done_callback(never_served)
    path = sockets / f"{view.job_id}.sock"
    view.params |= {"socket": str(path), "uri": uris([f"unix:{path}"])[0]}
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.shield(ready)
    except TimeoutError:
        ctx.jobs.cancel(view.job_id)
        raise ExportFailed(
            snapshot=target.snapshot_id, reason=f"not serving after {READY_TIMEOUT:.0f} s"
        ) from None
    view.say(f"serving disk {disk.name} of snapshot {target.snapshot_id} at {view.params['uri']}")
    log.info("export.serving", job=view.job_id, snapshot=target.snapshot_id, socket=str(path))
    return view


async def _serve(
    view: JobView,
    handle: JobStore,
    target: ExportTarget,
    path: Path,
    overlay: Path | None,
    ttl: timedelta | None,
    ready: "asyncio.Future[list[str]]",
) -> tuple[str, dict[str, Any]]:
    """The job's body: serve until cancelled or ``ttl``; ``ready`` gets the addresses, or
    the error that ended the export before it served."""
    stats = ServerStats()
    ended = "cancelled"
    try:
        with handle.store.reading_snapshot(target.snapshot_id):
            try:
                async with asyncio.timeout(ttl.total_seconds() if ttl is not None else None):
                    await serve_export(
                        handle.store,
                        handle.pool,
                        target,
                        [Listener(path=path)],
                        overlay=overlay,
                        ready=ready,
                        stats=stats,
                    )
            except TimeoutError:
                ended = "ttl"
                view.say(f"the export's time to live ({ttl}) is over")
    except BaseException as e:
        if not ready.done():
            reason = str(e) if isinstance(e, Exception) else "cancelled before it served"
            ready.set_exception(ExportFailed(snapshot=target.snapshot_id, reason=reason))
        raise
    finally:
        view.summary = _summary(stats, ended)
        if overlay is not None:
            for leftover in (overlay, overlay.with_name(overlay.name + ".tessera-map")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
    view.say(_line(stats))
    return "succeeded", view.summary


def _summary(stats: ServerStats, ended: str) -> dict[str, Any]:
    return {
        "ended": ended,
        "connections": stats.connections,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
    }


def _line(stats: ServerStats) -> str:
    return (
        f"export ended: {stats.connections} connections, {stats.bytes_read} bytes read, "
        f"{stats.bytes_written} bytes written"
    )


def running(ctx: DaemonContext) -> list[JobView]:
    return [v for v in ctx.jobs.running() if v.kind == KIND]
