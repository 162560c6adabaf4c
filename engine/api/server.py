"""The daemon's REST API (aiohttp): what ``tessera`` CLI commands and scripts talk to.

Listeners: a unix socket (mode 0600, so only root — the daemon's user — may connect; no
token) and, when configured, TCP with TLS where every request needs ``Authorization: Bearer
TOKEN`` with a token from ``tokens_file`` (one per line; ``#`` comments). Bodies are JSON
decoded into frozen structs (unknown keys refused). Every error is a JSON ``{"error": ...}``
with a 4xx status naming what was wrong; an unexpected fault is a 500 with a short message
(the traceback goes to the log, never to the client).

Routes (``GET /v1/openapi.json`` describes them): status, vms, policies (+ run now), jobs
(+ cancel), backups, restores, snapshots (+ protect, + check: restore verification as a job,
its last record in each snapshot's document), store usage, NBD exports (``POST /v1/exports``
starts one, ``GET /v1/exports`` lists them; ``engine.daemon.exports``), file browsing
sessions (``POST /v1/snapshots/{id}/files`` opens one; ``GET /v1/files/{session}`` with
``?wait=SECONDS``, ``…/ls``, ``…/find``, ``…/download`` streams a file or a directory as tar;
``DELETE`` ends it; ``engine.daemon.browse``), and ``/metrics``.
"""

import asyncio
import hmac
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from engine.api.models import (
    BackupRequest,
    CheckRequest,
    ExportRequest,
    FilesRequest,
    GcRequest,
    ProtectRequest,
    RestoreRequest,
    StandbyRefreshRequest,
)
from engine.app import check as app_check
from engine.app.standby import StandbyRequest
from engine.config.policy import Standby
from engine.config.types import Duration
from engine.core.errors import ConfigError, EngineError, SnapshotNotFound, StoreError
from engine.daemon import exports, maintenance, sites
from engine.daemon.browse import NotReady, SessionsFull
from engine.daemon.checks import start_check
from engine.daemon.jobs import AlreadyEnded, Busy, ShuttingDown
from engine.daemon.service import Service
from engine.maint.prune import is_protected, set_protected
from engine.maint.usage import store_usage
from engine.replication.state import PeerState, state_dir
from engine.restore.files import BadPath, PathNotFound
from engine.restore.record import LastCheck, read_record
from engine.store.manifest import Manifest

log = structlog.get_logger("tessera.api")

API: Final = "/v1"
SERVICE: web.AppKey[Service] = web.AppKey("service", Service)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """Bearer tokens, one per line; raises ConfigError naming the file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(message=f"tokens file {path}: {e.strerror}") from e
    tokens = tuple(t.encode() for line in lines if (t := line.split("#", 1)[0].strip()))
    if not tokens:
        raise ConfigError(message=f"tokens file {path} holds no token")
    return tokens


def _auth(tokens: tuple[bytes, ...]) -> Any:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        # compare against every token so the time taken says nothing about which matched
        ok = [hmac.compare_digest(given, t) for t in tokens]
        if scheme.lower() != "bearer" or not given or not any(ok):
            response = _error(401, "a valid bearer token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="tessera"'
            return response
        return await handler(request)

    return auth


# The HTTP status of each error class a handler may raise, most specific first
# (4xx: the request was wrong; 5xx: the daemon, the store or the engine failed).
_STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    ((msgspec.DecodeError, msgspec.ValidationError, BadPath), 400),
    ((Busy, AlreadyEnded, NotReady), 409),
    ((ShuttingDown, SessionsFull), 503),
    ((SnapshotNotFound, PathNotFound), 404),
    ((StoreError, exports.ExportFailed), 500),
)


def _status_of(e: Exception) -> int:
    for kind, code in _STATUS:
        if isinstance(e, kind):
            return code
    if isinstance(e, ConfigError):
        return 404 if str(e).startswith("no ") else 400
    return 502  # the engine or another remote side failed


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            return _error(e.status, e.reason)
        raise
    except (msgspec.DecodeError, msgspec.ValidationError, EngineError) as e:
        code = _status_of(e)
        if code >= 500:
            log.warning("api.error", path=request.path, error=str(e))
        prefix = "bad request body: " if code == 400 and not isinstance(e, EngineError) else ""
        return _error(code, prefix + str(e))
    except Exception as e:  # the API edge: a 500, the traceback to the log
        log.error("api.fault", path=request.path, error=repr(e), exc_info=True)
        return _error(500, f"internal error ({type(e).__name__}); see the daemon log")


async def _body(request: web.Request, kind: type[Any]) -> Any:
    raw = await request.read()
    return msgspec.json.decode(raw or b"{}", type=kind)


def snapshot_doc(m: Manifest, protected: bool, check: LastCheck = None) -> dict[str, Any]:
    """A snapshot's document; ``check`` is its last restore check's record (None: never;
    an unreadable record file: ``{"outcome": "unreadable", "error": …}``)."""
    return {
        "id": m.snapshot_id,
        "time": m.time,
        "vm": {"id": m.vm_id, "name": m.vm_name},
        "level": m.level,
        "parent": m.parent,
        "size": m.size,
        "protected": protected,
        "disks": [
            {"id": d.disk_id, "name": d.name, "size": d.size, "data_bytes": d.data_bytes}
            for d in m.disks
        ],
        "check": check.doc() if check is not None else None,
    }


def build_app(service: Service, tokens: tuple[bytes, ...] | None = None) -> web.Application:
    """The API on ``service``; with ``tokens`` every request must carry one of them."""
    middlewares: list[Any] = [errors]
    if tokens is not None:
        middlewares.insert(0, _auth(tokens))
    app = web.Application(middlewares=middlewares, client_max_size=1024**2)
    app[SERVICE] = service
    app.add_routes(
        [
            web.get(f"{API}/status", status),
            web.get(f"{API}/vms", vms),
            web.get(f"{API}/policies", policies),
            web.post(f"{API}/policies/{{name}}/run", run_policy),
            web.get(f"{API}/jobs", jobs),
            web.get(f"{API}/jobs/{{id}}", job),
            web.post(f"{API}/jobs/{{id}}/cancel", cancel_job),
            web.post(f"{API}/backups", start_backup),
            web.post(f"{API}/restores", start_restore),
            web.post(f"{API}/standby", start_standby_refresh),
            web.get(f"{API}/snapshots", snapshots),
            web.get(f"{API}/snapshots/{{id}}", snapshot),
            web.post(f"{API}/snapshots/{{id}}/protect", protect),
            web.post(f"{API}/snapshots/{{id}}/check", check_snapshot),
            web.get(f"{API}/store", store),
            web.post(f"{API}/maintenance/{{kind}}", start_maintenance),
            web.get(f"{API}/replication", replication),
            web.post(f"{API}/exports", start_export),
            web.get(f"{API}/exports", list_exports),
            web.post(f"{API}/snapshots/{{id}}/files", open_files),
            web.get(f"{API}/files/{{session}}", files_session),
            web.delete(f"{API}/files/{{session}}", end_files),
            web.get(f"{API}/files/{{session}}/ls", files_ls),
            web.get(f"{API}/files/{{session}}/find", files_find),
            web.get(f"{API}/files/{{session}}/download", files_download),
            web.get(f"{API}/openapi.json", openapi),
            web.get("/metrics", metrics),
        ]
    )
    return app


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


async def status(request: web.Request) -> web.Response:
    s = _service(request)
    return web.json_response(
        {
            "started": s.started.isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "stores": sorted(s.stores),
            "policies": len(s.policies),
            "running_jobs": [j.job_id for j in s.jobs.running()],
            "limits": s.limits.stats(),
        }
    )


async def vms(request: web.Request) -> web.Response:
    found = await _service(request).list_vms(request.query.get("engine"))
    return web.json_response(found)


async def policies(request: web.Request) -> web.Response:
    s = _service(request)
    status = {p.name: p for p in s.scheduler.status()} if s.scheduler else {}
    docs = []
    for policy in s.policies:
        st = status.get(policy.name)
        docs.append(
            {
                "name": policy.name,
                "enabled": policy.enabled,
                "schedule": [str(c) for c in policy.calendars] if policy.enabled else [],
                "flow": policy.flow,
                "level": policy.level.default,
                "next_run": st.next_run.isoformat() if st and st.next_run else None,
                "running": st.running.isoformat() if st and st.running else None,
                "last_started": st.last_started.isoformat() if st and st.last_started else None,
            }
        )
    return web.json_response(docs)


async def run_policy(request: web.Request) -> web.Response:
    s = _service(request)
    name = request.match_info["name"]
    if s.scheduler is None or name not in {p.name for p in s.policies if p.enabled}:
        raise ConfigError(message=f"no enabled policy {name!r}")
    event = await s.scheduler.trigger(name)
    return web.json_response(
        {"policy": name, "outcome": event.outcome, "reason": event.reason}, status=202
    )


async def jobs(request: web.Request) -> web.Response:
    running = request.query.get("running") in {"1", "true", "yes"}
    failed = request.query.get("failed") in {"1", "true", "yes"}
    since = request.query.get("since")
    views = _service(request).jobs.jobs(
        running_only=running, since=parse_since(since) if since else None, failed=failed
    )
    return web.json_response([v.doc() for v in views])


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``since``: a duration back from now (``24h``, ``7d``) or an ISO 8601 time (UTC when it
    names no zone). ConfigError (a 400) for anything else."""
    try:
        return (now or datetime.now(UTC)) - Duration(text).delta
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            message=f"since {text!r}: give a duration (24h, 7d) or an ISO time"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


async def job(request: web.Request) -> web.Response:
    """One job; with ``?wait=SECONDS`` (at most ``MAX_WAIT``) answered once it has ended or
    the time is up, whichever comes first (a client waits without polling)."""
    view = _service(request).jobs.get(request.match_info["id"])
    wait = _number(request, "wait")
    if wait and view.task is not None and not view.task.done():
        await asyncio.wait([view.task], timeout=min(wait, MAX_WAIT))
    return web.json_response(view.doc(lines=True))


async def cancel_job(request: web.Request) -> web.Response:
    view = _service(request).jobs.cancel(request.match_info["id"])
    return web.json_response(view.doc(), status=202)


async def start_backup(request: web.Request) -> web.Response:
    s = _service(request)
    body: BackupRequest = await _body(request, BackupRequest)
    if not body.vms:
        raise msgspec.ValidationError("`vms` must name at least one VM")
    level, flow, quiesce, store_name = body.level, body.flow, body.require_quiesce, body.store
    engine, disks = body.engine, body.disks or ()
    if body.policy is not None:
        policy = next((p for p in s.policies if p.name == body.policy), None)
        if policy is None:
            raise ConfigError(message=f"no policy {body.policy!r}")
        flow, quiesce, store_name = policy.flow, policy.require_quiesce, policy.store
        engine, level = policy.selection.engine, policy.level.default
        disks = policy.selection.disks if body.disks is None else disks
    vms_found = await s.list_vms(engine)
    known = [v["name"] for v in vms_found]
    names: list[str] = []
    for pattern in body.vms:
        matched = [n for n in known if fnmatchcase(n, pattern)]
        if not matched:
            raise ConfigError(message=f"no VM matches {pattern!r}")
        names += [n for n in matched if n not in names]
    views = s.start_backup(
        names,
        facts={v["name"]: v for v in vms_found},
        level=level,
        flow=flow,
        require_quiesce=quiesce,
        engine=engine,
        store=store_name,
        policy=body.policy,
        disks=disks,
    )
    return web.json_response({"jobs": [v.doc() for v in views]}, status=202)


async def start_restore(request: web.Request) -> web.Response:
    body: RestoreRequest = await _body(request, RestoreRequest)
    view = _service(request).start_restore(
        body.snapshot,
        name=body.name,
        cluster=body.cluster,
        storage_domain=body.storage_domain,
        flow=body.flow,
        engine=body.engine,
        store=body.store,
        disk=body.disk,
        into_vm=body.into_vm,
    )
    return web.json_response({"jobs": [view.doc()]}, status=202)


async def start_standby_refresh(request: web.Request) -> web.Response:
    """``tessera standby refresh`` as a daemon job (the daemon holds the store it reads and
    whose standby state it writes); refused (409) while that VM's standby is refreshed."""
    s = _service(request)
    body: StandbyRefreshRequest = await _body(request, StandbyRefreshRequest)
    handle = s.store(body.store)
    standby = Standby(
        peer="local",  # the snapshots are in this store
        cluster=body.cluster,
        storage_domain=body.storage_domain,
        name_suffix=body.suffix,
    )

    def vm_name() -> str:
        entries = handle.store.snapshots(body.vm)
        if not entries:
            raise ConfigError(message=f"no snapshots of VM {body.vm!r} in store {handle.name}")
        return handle.store.manifest(entries[-1].snapshot_id).vm_name

    name = await asyncio.to_thread(vm_name)
    request_ = StandbyRequest(body.vm, standby, body.snapshot, body.engine)
    view = sites.submit_standby(s, request_, name, store=handle.name)
    return web.json_response({"jobs": [view.doc()]}, status=202)


async def snapshots(request: web.Request) -> web.Response:
    handle = _service(request).store(request.query.get("store"))

    def read() -> list[dict[str, Any]]:
        st = handle.store
        entries = st.snapshots(request.query.get("vm"))
        return [
            snapshot_doc(
                st.manifest(e.snapshot_id),
                is_protected(st.layout, e.snapshot_id),
                read_record(st.layout, e.snapshot_id),
            )
            for e in entries
        ]

    return web.json_response(await asyncio.to_thread(read))


async def snapshot(request: web.Request) -> web.Response:
    handle = _service(request).store(request.query.get("store"))
    st = handle.store
    snapshot_id = st.resolve(request.match_info["id"])
    manifest = await asyncio.to_thread(st.manifest, snapshot_id)
    doc = snapshot_doc(
        manifest, is_protected(st.layout, snapshot_id), read_record(st.layout, snapshot_id)
    )
    doc["tags"] = dict(manifest.tags)
    return web.json_response(doc)


async def protect(request: web.Request) -> web.Response:
    handle = _service(request).store(request.query.get("store"))
    body: ProtectRequest = await _body(request, ProtectRequest)
    snapshot_id = handle.store.resolve(request.match_info["id"])
    await asyncio.to_thread(set_protected, handle.store, snapshot_id, body.protected)
    return web.json_response({"id": snapshot_id, "protected": body.protected})


async def check_snapshot(request: web.Request) -> web.Response:
    """Restore verification of one snapshot as a ``check`` job (``engine.daemon.checks``);
    202 with the job, whose summary is the record it leaves on the snapshot."""
    handle = _service(request).store(request.query.get("store"))
    body: CheckRequest = await _body(request, CheckRequest)
    asked = app_check.CheckRequest(
        request.match_info["id"], body.disks or (), body.expect or (), body.launch_timeout
    )
    view = start_check(_service(request), handle, asked)
    return web.json_response({"jobs": [view.doc()]}, status=202)


async def store(request: web.Request) -> web.Response:
    handle = _service(request).store(request.query.get("store"))
    usage = await asyncio.to_thread(store_usage, handle.store)
    return web.json_response({"store": handle.name} | usage.doc())


async def start_maintenance(request: web.Request) -> web.Response:
    """Run GC or verify now on one store (``?store=``) or every store; a GC takes the
    options of its body (``GcRequest``: a dry run, another threshold or grace)."""
    s = _service(request)
    kind = request.match_info["kind"]
    if kind not in ("gc", "verify"):
        raise ConfigError(message=f"no maintenance {kind!r} (gc or verify)")
    gc = None
    if kind == "gc":
        body: GcRequest = await _body(request, GcRequest)
        grace = None if body.grace_seconds is None else timedelta(seconds=body.grace_seconds)
        gc = maintenance.GcAsked(body.dry_run, body.repack_threshold, grace, body.rate_limit)
    name = request.query.get("store")
    handles = [s.store(name)] if name else list(s.stores.values())
    views = [maintenance.start(s, kind, handle, gc=gc) for handle in handles]
    return web.json_response({"jobs": [v.doc() for v in views]}, status=202)


async def replication(request: web.Request) -> web.Response:
    """What each store has pushed to each peer: per VM the last snapshot replicated and
    when, and the jobs of kind ``replicate`` still running."""
    s = _service(request)

    def read() -> list[dict[str, Any]]:
        out = []
        for name, handle in sorted(s.stores.items()):
            directory = state_dir(handle.store.path)
            for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
                state = PeerState.load(handle.store.path, path.stem)
                out.append({"store": name, "peer": state.peer, "vms": state.vms})
        return out

    running = [j.doc() for j in s.jobs.running() if j.kind == "replicate"]
    return web.json_response({"peers": await asyncio.to_thread(read), "running": running})


async def start_export(request: web.Request) -> web.Response:
    """An NBD export as a daemon job; answers once it serves, with its socket and URI."""
    body: ExportRequest = await _body(request, ExportRequest)
    if body.ttl_seconds is not None and not body.ttl_seconds > 0:
        raise msgspec.ValidationError("`ttl_seconds` must be positive")
    ttl = None if body.ttl_seconds is None else timedelta(seconds=body.ttl_seconds)
    asked = exports.ExportAsked(body.snapshot, body.disk, body.store, body.writable_overlay, ttl)
    view = await exports.start(_service(request), asked)
    return web.json_response({"export": exports.doc(view), "jobs": [view.doc()]}, status=202)


async def list_exports(request: web.Request) -> web.Response:
    return web.json_response([exports.doc(v) for v in exports.running(_service(request))])


async def open_files(request: web.Request) -> web.Response:
    """A browsing session (a job of kind ``files``); answers at once, ``starting``: ``GET
    /v1/files/{session}?wait=60`` returns once the appliance is up."""
    body: FilesRequest = await _body(request, FilesRequest)
    session = await _service(request).sessions.open(
        request.match_info["id"], store=body.store, disks=body.disks or ()
    )
    return web.json_response(session.doc(), status=202)


MAX_WAIT: Final = 300.0  # seconds a ``GET /v1/files/{session}?wait=`` may hold the request


async def files_session(request: web.Request) -> web.Response:
    sessions = _service(request).sessions
    wait = _number(request, "wait")
    session_id = request.match_info["session"]
    if wait:
        session = await sessions.wait(session_id, min(wait, MAX_WAIT))
    else:
        session = sessions.get(session_id)
    return web.json_response(session.doc())


async def end_files(request: web.Request) -> web.Response:
    view = _service(request).sessions.end(request.match_info["session"])
    return web.json_response(view.doc(), status=202)


def _number(request: web.Request, name: str) -> float:
    text = request.query.get(name)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise msgspec.ValidationError(f"`{name}` must be a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise msgspec.ValidationError(f"`{name}` must be a number of seconds")
    return value


def _path(request: web.Request) -> str:
    path = request.query.get("path")
    if path is None:
        raise msgspec.ValidationError("`path` is required (an absolute path of the tree)")
    return path


async def files_ls(request: web.Request) -> web.Response:
    entries = await _service(request).sessions.ls(request.match_info["session"], _path(request))
    return web.json_response({"entries": [asdict(e) for e in entries]})


async def files_find(request: web.Request) -> web.Response:
    found = await _service(request).sessions.find(
        request.match_info["session"], _path(request), request.query.get("name")
    )
    return web.json_response({"paths": found})


async def files_download(request: web.Request) -> web.StreamResponse:
    """A file as itself (with its length), a directory as ``application/x-tar`` (chunked):
    streamed while the appliance's helper writes it (``engine.daemon.browse.Download``). A
    transfer that fails before its first byte is an error answer (the JSON error names the
    staging file and the errno); after it, the connection is cut: the client sees a body
    short of its Content-Length or a chunked body without its end, never a whole-looking one."""
    got = await _service(request).sessions.download(request.match_info["session"], _path(request))
    try:
        blocks = got.blocks()
        # the first block before the headers: a transfer that fails before its first byte
        # (the state dir already full) is an error answer, not a 200 cut short
        try:
            first = await anext(blocks, b"")
        except EngineError:
            await blocks.aclose()
            raise
        response = web.StreamResponse(
            headers={
                "Content-Type": got.content_type,
                "Content-Disposition": content_disposition(got.name),
                "X-Content-Type-Options": "nosniff",
            }
        )
        if got.size is not None:
            response.content_length = got.size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            # one block behind: the staging file is closed (its space free) before the
            # client has the last byte, or sees the cut
            last = first
            async for block in blocks:
                await response.write(last)
                last = block
            got.close()
            if last:  # an empty file has none
                await response.write(last)
        except EngineError as e:  # the headers are out: the client sees the stream cut short
            log.warning("api.download_failed", path=request.path, error=str(e))
            got.close()
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionResetError:
            return response  # the client left; the transfer ends in the session, unread
        await response.write_eof()
        return response
    finally:
        got.close()


def content_disposition(name: str) -> str:
    """``attachment`` with ``name`` as RFC 6266 has it: an ASCII ``filename`` (anything else,
    quotes and backslashes too, as ``_``) and the exact name as UTF-8 in ``filename*``. The
    name comes from the guest's filesystem: untrusted, so no byte of it reaches the header
    unencoded."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%/;' else "_" for c in name)
    encoded = urllib.parse.quote(name, safe="")
    return f"attachment; filename=\"{fallback or 'download'}\"; filename*=UTF-8''{encoded}"


async def metrics(request: web.Request) -> web.Response:
    body, content_type = _service(request).metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def openapi(request: web.Request) -> web.Response:
    from engine.api.openapi import document  # noqa: PLC0415 - built on demand

    return web.json_response(document())


async def start_listeners(service: Service) -> Callable[[], Awaitable[None]]:
    """Start the unix socket (and TCP+TLS) listeners; returns their cleanup."""
    section = service.config.api
    runners: list[web.AppRunner] = []
    try:
        unix = web.AppRunner(build_app(service), access_log=None)
        await unix.setup()
        runners.append(unix)
        section.socket.parent.mkdir(parents=True, exist_ok=True)
        section.socket.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is created 0600: root only
        try:
            await web.UnixSite(unix, str(section.socket)).start()
        finally:
            os.umask(old)
        if section.tcp is not None:
            tcp = section.tcp
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tcp.cert_file, tcp.key_file)
            host, _, port = tcp.listen.rpartition(":")
            runner = web.AppRunner(
                build_app(service, load_tokens(tcp.tokens_file)), access_log=None
            )
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context).start()
        log.info(
            "api.listening",
            socket=str(section.socket),
            tcp=section.tcp.listen if section.tcp else None,
        )
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise

    async def stop() -> None:
        for runner in runners:
            await runner.cleanup()
        section.socket.unlink(missing_ok=True)

    return stop
