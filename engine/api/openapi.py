"""The OpenAPI 3.1 description of the daemon's API (``GET /v1/openapi.json``).

Kept next to the routes in ``api``; a test checks that every route is described here and
that every path described here is a route, so the two cannot drift apart.
"""

from typing import Any

import msgspec

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

_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _op(
    summary: str,
    *,
    body: str | None = None,
    params: tuple[str, ...] = (),
    ok: str = "200",
    body_required: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: {"description": "OK", "content": {"application/json": {}}},
            "4XX": _ERROR,
        },
    }
    if params:
        op["parameters"] = [
            {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
            for n in params
        ]
    if body is not None:
        op["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


def _id(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]


def _query(name: str, *, required: bool = False) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": required, "schema": {"type": "string"}}]


PATHS: dict[str, dict[str, Any]] = {
    "/v1/status": {"get": _op("Daemon status: stores, policies, running jobs")},
    "/v1/vms": {"get": _op("VMs of an engine (name, cluster, tags, disks)", params=("engine",))},
    "/v1/policies": {"get": _op("Policies with their schedule and next run")},
    "/v1/policies/{name}/run": {
        "post": _op("Run a policy now", ok="202") | {"parameters": _id("name")}
    },
    "/v1/jobs": {
        "get": _op(
            "Jobs: running, and finished ones kept across restarts (``since``: a duration such "
            "as 24h or an ISO time; ``failed``: only those that did not succeed)",
            params=("running", "since", "failed"),
        )
    },
    "/v1/jobs/{id}": {
        "get": _op(
            "One job: state, per-disk progress, log; wait=SECONDS holds the answer until the "
            "job has ended (at most 300 s)"
        )
        | {"parameters": _id("id") + _op("", params=("wait",))["parameters"]}
    },
    "/v1/jobs/{id}/cancel": {
        "post": _op("Cancel a running job (409 once it has ended)", ok="202")
        | {"parameters": _id("id")}
    },
    "/v1/backups": {"post": _op("Back up VMs now", body="BackupRequest", ok="202")},
    "/v1/restores": {
        "post": _op("Restore a snapshot as a new VM", body="RestoreRequest", ok="202")
    },
    "/v1/standby": {
        "post": _op(
            "Refresh a VM's cold standby now (409 while it is refreshed)",
            body="StandbyRefreshRequest",
            ok="202",
        )
    },
    "/v1/snapshots": {"get": _op("Snapshots (restore points)", params=("vm", "store"))},
    "/v1/snapshots/{id}": {
        "get": _op("One snapshot", params=("store",)) | {"parameters": _id("id")}
    },
    "/v1/snapshots/{id}/protect": {
        "post": _op("Protect or unprotect a snapshot", body="ProtectRequest")
        | {"parameters": _id("id")}
    },
    "/v1/snapshots/{id}/check": {
        "post": _op(
            "Check a restore point read-only in an appliance VM (fsck in no-write mode, "
            "expected paths); a check job, its record on the snapshot",
            body="CheckRequest",
            ok="202",
            body_required=False,
        )
        | {"parameters": _id("id") + _op("", params=("store",))["parameters"]}
    },
    "/v1/store": {
        "get": _op("Store space: logical, unique, shared, stored bytes", params=("store",))
    },
    "/v1/maintenance/{kind}": {
        "post": _op(
            "Run gc or verify now (every store, or ?store=); a gc takes GcRequest's options",
            body="GcRequest",
            ok="202",
            body_required=False,
        )
        | {"parameters": _id("kind") + _op("", params=("store",))["parameters"]}
    },
    "/v1/replication": {"get": _op("Replication state per store, peer and VM")},
    "/v1/exports": {
        "post": _op(
            "Serve one disk of a snapshot over NBD as a job of kind export (until cancelled or "
            "ttl_seconds); answers once it serves, with its unix socket and nbd+unix URI",
            body="ExportRequest",
            ok="202",
        ),
        "get": _op("The NBD exports being served: job, snapshot, disk, socket, URI, expiry"),
    },
    "/v1/snapshots/{id}/files": {
        "post": _op(
            "Open a file browsing session (a job of kind files booting an appliance on the "
            "snapshot's disks); 503 when serve.files_sessions are open",
            body="FilesRequest",
            ok="202",
            body_required=False,
        )
        | {"parameters": _id("id")}
    },
    "/v1/files/{session}": {
        "get": _op(
            "A session: state (starting, ready, ended), its filesystems; wait=SECONDS holds "
            "the answer until it is no longer starting",
            params=("wait",),
        )
        | {"parameters": _id("session") + _op("", params=("wait",))["parameters"]},
        "delete": _op("End a session (its appliance stops)", ok="202")
        | {"parameters": _id("session")},
    },
    "/v1/files/{session}/ls": {
        "get": _op("Entries of a directory (name, kind, size, mode, mtime, target)")
        | {"parameters": _id("session") + _query("path", required=True)}
    },
    "/v1/files/{session}/find": {
        "get": _op("Paths under path whose name matches the glob name")
        | {"parameters": _id("session") + _query("path", required=True) + _query("name")}
    },
    "/v1/files/{session}/download": {
        "get": {
            "summary": "A file (application/octet-stream), or a directory as a tar archive "
            "(application/x-tar, chunked), streamed as the appliance writes it, with an RFC 6266 "
            "Content-Disposition (a file also with its Content-Length). A transfer that fails "
            "before its first byte (e.g. the daemon's state dir full) is an error answer; after "
            "it the connection is cut: a body short of its Content-Length or without its last "
            "chunk is a failed download",
            "parameters": _id("session") + _query("path", required=True),
            "responses": {
                "200": {
                    "description": "the bytes",
                    "content": {"application/octet-stream": {}, "application/x-tar": {}},
                },
                "4XX": _ERROR,
                "5XX": _ERROR,
            },
        }
    },
    "/v1/openapi.json": {"get": _op("This description")},
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text exposition"}},
        }
    },
}


def document() -> dict[str, Any]:
    _, defs = msgspec.json.schema_components(
        (
            BackupRequest,
            RestoreRequest,
            ProtectRequest,
            GcRequest,
            StandbyRefreshRequest,
            CheckRequest,
            ExportRequest,
            FilesRequest,
        ),
        ref_template="#/components/schemas/{name}",
    )
    defs["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tessera DataMover API", "version": "1"},
        "paths": PATHS,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
