"""``/ovirt-engine/api``: the API root and the read-only inventory (API-NOTES § 2.3, § 3).

Every request under the API prefix goes through ``api_middleware``:

- ``Authorization: Bearer <token>`` must name a live SSO token, else 401 ``<fault>``;
- a ``Version`` header other than ``4`` is a 400 (the SDK always sends ``Version: 4``);
- any error, including aiohttp's own 404/405, leaves as an XML ``<fault>``: the SDK only maps
  status codes to ``NotFoundError``/``AuthError`` when the body is XML or empty;
- the ``FAULTS`` knobs (``faults``), when the app has them, delay every request (``slow_ms``)
  and refuse the next authenticated ones with a 503 ``<fault>`` (``http_5xx``).

Lists accept ``search=`` (see ``search``; ``page N`` pages by ``max``), ``case_sensitive=`` and
``max=``; VMs also accept
``follow=disk_attachments``, ``follow=disk_attachments.disk`` and ``follow=tags``, which inline
those sub-collections. ``all_content=true`` (query, or the ``All-Content: true`` header the SDK
adds along) adds each VM's OVF (``ovf.vm_ovf``) in ``initialization.configuration``.
A storage domain's status in its data center (active, maintenance…) is served only under
``datacenters/{id}/storagedomains[/{sd}]``, as the engine does; ``storagedomains`` shows the
status of an unattached domain alone.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from aiohttp import web
from ovirtsdk4 import types

from plugins.lab.engine import ovf, render, search
from plugins.lab.engine.faults import FAULTS
from plugins.lab.engine.sso import Sessions
from plugins.lab.engine.state import (
    BLANK_TEMPLATE_ID,
    ROOT_TAG_ID,
    Inventory,
    StorageDomain,
    Vm,
    lab_id,
)

INVENTORY = web.AppKey("inventory", Inventory)
SESSIONS = web.AppKey("sessions", Sessions)

_log = logging.getLogger(__name__)
SEARCH_RESULTS_LIMIT = 100  # engine-config SearchResultsLimit: the page size without max=
VM_FOLLOWS = frozenset({"disk_attachments", "disk_attachments.disk", "tags"})
_T = TypeVar("_T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Fault(Exception):
    """Raised by handlers; the middleware turns it into an XML ``<fault>`` with ``status``."""

    def __init__(self, status: int, detail: str, reason: str = "Operation Failed") -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(render.API):
        return await handler(request)
    faults = request.app.get(FAULTS)
    if faults is not None and faults.slow_ms > 0:
        await asyncio.sleep(faults.slow_ms / 1000)
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    try:
        return await handler(request)
    except Fault as e:
        return render.fault(e.status, e.reason, e.detail)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return render.fault(e.status, e.reason, f"{request.method} {request.path}: {e.reason}")
    except Exception as e:  # noqa: BLE001 - a bug or a failing tool: still a <fault>
        _log.exception("%s %s failed", request.method, request.path)
        return render.fault(500, "Internal Server Error", f"{type(e).__name__}: {e}")


def _refusal(request: web.Request) -> web.Response | None:
    """The fault for a bad ``Version`` header or a missing/unknown token, else None; or the
    503 ``Faults.http_5xx`` still asks for."""
    version = request.headers.get("Version")
    if version not in (None, "4"):
        return render.fault(400, "Bad Request", f"unsupported API version {version!r}")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or request.app[SESSIONS].user(token.strip()) is None:
        return render.fault(401, "Unauthorized", "missing, unknown or revoked access token")
    faults = request.app.get(FAULTS)
    if faults is not None and faults.http_5xx > 0:
        faults.http_5xx -= 1
        return render.fault(
            503, "Service Unavailable", "the lab engine refuses this request (Faults.http_5xx)"
        )
    return None


def _get(table: Mapping[str, _T], request: web.Request, kind: str) -> _T:
    obj_id = request.match_info["id"]
    try:
        return table[obj_id]
    except KeyError:
        raise Fault(404, f"Entity not found: {kind} {obj_id}", "Not Found") from None


def _attached(request: web.Request) -> list[StorageDomain]:
    inv = request.app[INVENTORY]
    dc = _get(inv.data_centers, request, "data center")
    return [s for s in inv.storage_domains.values() if s.attached and s.data_center_id == dc.id]


async def _dc_storage_domains(request: web.Request) -> web.Response:
    """``datacenters/{id}/storagedomains``: the domains attached to the data center,
    each with its status there."""
    return render.xml_response(
        [render.storage_domain(s, in_data_center=True) for s in _attached(request)],
        root="storage_domains",
    )


async def _dc_storage_domain(request: web.Request) -> web.Response:
    sd_id = request.match_info["sd_id"]
    for sd in _attached(request):
        if sd.id == sd_id:
            return render.xml_response(render.storage_domain(sd, in_data_center=True))
    raise Fault(404, f"Entity not found: storage domain {sd_id}", "Not Found")


def _listing(
    request: web.Request,
    root: str,
    objs: Iterable[_T],
    fields: Callable[[_T], Mapping[str, str | Iterable[str] | None]],
    render_one: Callable[[_T], object],
) -> web.Response:
    """Filter ``objs`` by ``search``/``max`` and write them under ``<root>``."""
    q = request.query
    case_sensitive = q.get("case_sensitive", "true").lower() != "false"
    items = list(objs)
    if not items:  # no object to learn the field names from; any search selects nothing
        return render.xml_response([], root=root)
    known = fields(items[0]).keys()
    try:
        query = search.parse(q.get("search"), known, case_sensitive=case_sensitive)
    except search.SearchError as e:
        raise Fault(400, str(e)) from None
    selected = [o for o in items if query.matches(fields(o))]
    limit = None
    if "max" in q:
        try:
            limit = max(0, int(q["max"]))
        except ValueError:
            raise Fault(400, f"max={q['max']!r} is not a number") from None
    if query.page is not None:  # ``page N``: pages of ``max`` (else the engine's 100)
        size = SEARCH_RESULTS_LIMIT if limit is None else limit
        selected = selected[(query.page - 1) * size : query.page * size]
    elif limit is not None:
        selected = selected[:limit]
    return render.xml_response([render_one(o) for o in selected], root=root)


def _follows(request: web.Request) -> set[str]:
    wanted = {f.strip() for f in request.query.get("follow", "").split(",") if f.strip()}
    unknown = wanted - VM_FOLLOWS
    if unknown:
        raise Fault(400, f"cannot follow {', '.join(sorted(unknown))}")
    return wanted


def routes() -> list[web.RouteDef]:
    """The API routes; handlers read the ``INVENTORY`` and ``SESSIONS`` app keys."""

    async def root(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        up = sum(1 for v in inv.vms.values() if v.status == "up")
        user = types.User(id=lab_id("user", inv.username), user_name=inv.username)

        def item(active: int, total: int) -> types.ApiSummaryItem:
            return types.ApiSummaryItem(active=active, total=total)

        api = types.Api(
            product_info=types.ProductInfo(
                name="oVirt Engine",
                vendor="ovirt.org",
                instance_id=lab_id("instance", "lab"),
                version=types.Version(
                    major=4, minor=5, build=7, revision=0, full_version="4.5.7-tessera-lab"
                ),
            ),
            special_objects=types.SpecialObjects(
                blank_template=types.Template(id=BLANK_TEMPLATE_ID),
                root_tag=types.Tag(id=ROOT_TAG_ID),
            ),
            summary=types.ApiSummary(
                vms=item(up, len(inv.vms)),
                hosts=item(len(inv.hosts), len(inv.hosts)),
                storage_domains=item(len(inv.storage_domains), len(inv.storage_domains)),
                users=item(1, 1),
            ),
            time=datetime.now(UTC),
            authenticated_user=user,
            effective_user=user,
        )
        return render.xml_response(api)

    async def datacenters(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request,
            "data_centers",
            inv.data_centers.values(),
            lambda d: {"name": d.name, "id": d.id},
            render.data_center,
        )

    async def datacenter(request: web.Request) -> web.Response:
        dc = _get(request.app[INVENTORY].data_centers, request, "data center")
        return render.xml_response(render.data_center(dc))

    async def clusters(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request,
            "clusters",
            inv.clusters.values(),
            lambda c: {
                "name": c.name,
                "id": c.id,
                "datacenter": inv.data_centers[c.data_center_id].name,
            },
            render.cluster,
        )

    async def cluster(request: web.Request) -> web.Response:
        c = _get(request.app[INVENTORY].clusters, request, "cluster")
        return render.xml_response(render.cluster(c))

    async def storage_domains(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request,
            "storage_domains",
            inv.storage_domains.values(),
            lambda s: {"name": s.name, "id": s.id, "type": "data", "status": s.status},
            render.storage_domain,
        )

    async def storage_domain(request: web.Request) -> web.Response:
        sd = _get(request.app[INVENTORY].storage_domains, request, "storage domain")
        return render.xml_response(render.storage_domain(sd))

    async def hosts(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request,
            "hosts",
            inv.hosts.values(),
            lambda h: {
                "name": h.name,
                "id": h.id,
                "status": "up",
                "cluster": inv.clusters[h.cluster_id].name,
            },
            render.host,
        )

    async def host(request: web.Request) -> web.Response:
        h = _get(request.app[INVENTORY].hosts, request, "host")
        return render.xml_response(render.host(h))

    async def vms(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        follow = _follows(request)
        return _listing(
            request,
            "vms",
            inv.vms.values(),
            lambda v: {
                "name": v.name,
                "id": v.id,
                "status": v.status,
                "cluster": inv.clusters[v.cluster_id].name,
                "host": inv.hosts[v.host_id].name if v.host_id else None,
                "tag": [inv.tags[t].name for t in v.tag_ids],
            },
            lambda v: _vm(inv, v, follow, all_content(request)),
        )

    async def vm(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        v = _get(inv.vms, request, "VM")
        return render.xml_response(_vm(inv, v, _follows(request), all_content(request)))

    async def vm_attachments(request: web.Request) -> web.Response:
        v = _get(request.app[INVENTORY].vms, request, "VM")
        return render.xml_response(
            [render.attachment(v, a) for a in v.attachments], root="disk_attachments"
        )

    async def vm_attachment(request: web.Request) -> web.Response:
        v = _get(request.app[INVENTORY].vms, request, "VM")
        disk_id = request.match_info["disk_id"]
        for a in v.attachments:
            if a.disk_id == disk_id:
                return render.xml_response(render.attachment(v, a))
        raise Fault(404, f"Entity not found: disk attachment {disk_id} of VM {v.id}", "Not Found")

    async def vm_tags(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        v = _get(inv.vms, request, "VM")
        return render.xml_response([render.tag(inv.tags[t]) for t in v.tag_ids], root="tags")

    async def disks(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request,
            "disks",
            inv.disks.values(),
            lambda d: {
                "name": d.alias,
                "alias": d.alias,
                "id": d.id,
                "status": d.status,
                "format": d.format,
                "storage": inv.storage_domains[d.storage_domain_id].name,
            },
            render.disk,
        )

    async def disk(request: web.Request) -> web.Response:
        d = _get(request.app[INVENTORY].disks, request, "disk")
        return render.xml_response(render.disk(d))

    async def tags(request: web.Request) -> web.Response:
        inv = request.app[INVENTORY]
        return _listing(
            request, "tags", inv.tags.values(), lambda t: {"name": t.name, "id": t.id}, render.tag
        )

    async def tag(request: web.Request) -> web.Response:
        t = _get(request.app[INVENTORY].tags, request, "tag")
        return render.xml_response(render.tag(t))

    a = render.API
    return [
        web.get(a, root),
        web.get(f"{a}/", root),
        web.get(f"{a}/datacenters", datacenters),
        web.get(f"{a}/datacenters/{{id}}", datacenter),
        web.get(f"{a}/datacenters/{{id}}/storagedomains", _dc_storage_domains),
        web.get(f"{a}/datacenters/{{id}}/storagedomains/{{sd_id}}", _dc_storage_domain),
        web.get(f"{a}/clusters", clusters),
        web.get(f"{a}/clusters/{{id}}", cluster),
        web.get(f"{a}/storagedomains", storage_domains),
        web.get(f"{a}/storagedomains/{{id}}", storage_domain),
        web.get(f"{a}/hosts", hosts),
        web.get(f"{a}/hosts/{{id}}", host),
        web.get(f"{a}/vms", vms),
        web.get(f"{a}/vms/{{id}}", vm),
        web.get(f"{a}/vms/{{id}}/diskattachments", vm_attachments),
        web.get(f"{a}/vms/{{id}}/diskattachments/{{disk_id}}", vm_attachment),
        web.get(f"{a}/vms/{{id}}/tags", vm_tags),
        web.get(f"{a}/disks", disks),
        web.get(f"{a}/disks/{{id}}", disk),
        web.get(f"{a}/tags", tags),
        web.get(f"{a}/tags/{{id}}", tag),
    ]


def all_content(request: web.Request) -> bool:
    """``all_content=true`` in the query or an ``All-Content: true`` header (API-NOTES § 1.3)."""
    value = request.query.get("all_content") or request.headers.get("All-Content") or ""
    return value.lower() == "true"


def _vm(inv: Inventory, v: Vm, follow: set[str], content: bool = False) -> types.Vm:
    attachments = None
    if follow & {"disk_attachments", "disk_attachments.disk"}:
        full = "disk_attachments.disk" in follow
        attachments = [
            render.attachment(v, a, inv.disks[a.disk_id] if full else None) for a in v.attachments
        ]
    tags = [render.tag(inv.tags[t]) for t in v.tag_ids] if "tags" in follow else None
    ovf_text = ovf.vm_ovf(inv, v) if content else None
    return render.vm(v, attachments=attachments, tags=tags, ovf=ovf_text)
