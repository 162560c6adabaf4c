"""The real ovirtsdk4 client against the fake engine: SSO, API root and inventory.

The SDK blocks (pycurl), so every SDK call runs in a worker thread via ``asyncio.to_thread``
while the fake engine serves on this test's event loop.
"""

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import ovirtsdk4 as sdk
import pytest
from ovirtsdk4 import types

from plugins.lab.engine import FakeEngine, demo_seed, lab_id

GiB = 1024**3


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(demo_seed(), tmp_path) as fake:
        yield fake


def connect(engine: FakeEngine, **overrides: Any) -> sdk.Connection:
    options: dict[str, Any] = {
        "url": engine.url,
        "username": engine.username,
        "password": engine.password,
        "ca_file": str(engine.ca_file),
        "timeout": 20,
    }
    options.update(overrides)
    return sdk.Connection(**options)


async def with_sdk(engine: FakeEngine, fn: Callable[[sdk.Connection], Any], **kw: Any) -> Any:
    """Open a connection, run ``fn(conn)`` in a thread, always close (with logout)."""

    def run() -> Any:
        conn = connect(engine, **kw)
        try:
            return fn(conn)
        finally:
            conn.close()

    return await asyncio.to_thread(run)


async def test_connection_test_logs_in_and_out(engine: FakeEngine) -> None:
    def check(conn: sdk.Connection) -> Any:
        assert conn.test(raise_exception=True)
        assert len(engine.sessions) == 1
        return conn.system_service().get()

    api = await with_sdk(engine, check)
    assert api.product_info.version.major == 4
    assert api.summary.vms.total == 3
    assert api.summary.vms.active == 2
    assert api.time.tzinfo is not None
    assert api.authenticated_user.user_name == "admin@internal"
    assert len(engine.sessions) == 0  # close() revoked the token


async def test_clusters_storage_domains_hosts(engine: FakeEngine) -> None:
    def check(conn: sdk.Connection) -> Any:
        system = conn.system_service()
        clusters = system.clusters_service().list()
        prod = system.clusters_service().list(search="name=Prod")
        sds = system.storage_domains_service().list()
        hosts = system.hosts_service().list()
        host2 = system.hosts_service().host_service(lab_id("host", "host2")).get()
        dcs = system.data_centers_service().list()
        return clusters, prod, sds, hosts, host2, dcs

    clusters, prod, sds, hosts, host2, dcs = await with_sdk(engine, check)
    assert [c.name for c in clusters] == ["Default", "Prod"]
    assert (clusters[0].version.major, clusters[0].version.minor) == (4, 7)
    assert clusters[0].data_center.id == dcs[0].id
    assert [c.name for c in prod] == ["Prod"]
    assert [(s.name, s.type, s.master, s.storage.type) for s in sds] == [
        ("data1", types.StorageDomainType.DATA, True, types.StorageType.NFS),
        ("data2", types.StorageDomainType.DATA, False, types.StorageType.NFS),
        ("block1", types.StorageDomainType.DATA, False, types.StorageType.ISCSI),
    ]
    assert [h.name for h in hosts] == ["host1", "host2"]
    assert host2.cluster.id == prod[0].id
    assert host2.status == types.HostStatus.UP


async def test_vm_list_and_search(engine: FakeEngine) -> None:
    def check(conn: sdk.Connection) -> Any:
        vms = conn.system_service().vms_service()
        return (
            vms.list(),
            vms.list(search="name=web01"),
            vms.list(search="name=web*"),
            vms.list(search="cluster=Prod"),
            vms.list(search="cluster=Default and status=up"),
            vms.list(search="name=WEB01", case_sensitive=False),
            vms.list(search="tag=gold or name=db01", all_content=True),
            vms.list(search="name=nosuchvm"),
            vms.list(max=1),
        )

    all_, web01, web, prod, up, ci, tagged, none, first = await with_sdk(engine, check)

    def names(vms: list[Any]) -> list[str]:
        return [v.name for v in vms]

    assert names(all_) == ["web01", "web02", "db01"]
    assert names(web01) == ["web01"]
    assert names(web) == ["web01", "web02"]
    assert names(prod) == ["db01"]
    assert names(up) == ["web01"]
    assert names(ci) == ["web01"]
    assert names(tagged) == ["web01", "db01"]
    assert none == []
    assert names(first) == ["web01"]


async def test_bad_search_is_a_400_fault(engine: FakeEngine) -> None:
    def check(conn: sdk.Connection) -> None:
        conn.system_service().vms_service().list(search="colour=red")

    with pytest.raises(sdk.Error) as info:
        await with_sdk(engine, check)
    assert info.value.code == 400
    assert "colour" in info.value.fault.detail


async def test_vm_disk_attachments_and_disks(engine: FakeEngine) -> None:
    vm_id = lab_id("vm", "web01")

    def check(conn: sdk.Connection) -> Any:
        vm_service = conn.system_service().vms_service().vm_service(vm_id)
        vm = vm_service.get()
        attachments = conn.follow_link(vm.disk_attachments)
        listed = vm_service.disk_attachments_service().list()
        one = vm_service.disk_attachments_service().attachment_service(listed[1].id).get()
        disks = [conn.follow_link(a.disk) for a in attachments]
        followed = (
            conn.system_service()
            .vms_service()
            .list(search="name=web01", follow="disk_attachments.disk")
        )
        all_disks = conn.system_service().disks_service().list()
        return vm, attachments, listed, one, disks, followed, all_disks

    vm, attachments, listed, one, disks, followed, all_disks = await with_sdk(engine, check)
    assert vm.id == vm_id
    assert vm.name == "web01"
    assert vm.status == types.VmStatus.UP
    assert vm.host.id == lab_id("host", "host1")
    assert vm.cluster.id == lab_id("cluster", "Default")
    assert vm.memory == 2 * GiB
    assert vm.cpu.topology.cores == 2

    assert [a.id for a in attachments] == [a.id for a in listed]
    os_att, data_att = attachments
    assert os_att.id == os_att.disk.id == lab_id("disk", "web01_os")  # attachment id = disk id
    assert (os_att.interface, os_att.bootable, os_att.active) == (
        types.DiskInterface.VIRTIO_SCSI,
        True,
        True,
    )
    assert (data_att.bootable, one.id, one.vm.id) == (False, data_att.id, vm_id)

    os_disk, data_disk = disks
    assert (os_disk.alias, os_disk.format, os_disk.provisioned_size, os_disk.sparse) == (
        "web01_os",
        types.DiskFormat.COW,
        10 * GiB,
        True,
    )
    assert os_disk.backup == types.DiskBackup.INCREMENTAL
    assert os_disk.status == types.DiskStatus.OK
    assert os_disk.storage_domains[0].id == lab_id("sd", "data1")
    assert (data_disk.format, data_disk.provisioned_size, data_disk.actual_size) == (
        types.DiskFormat.RAW,
        20 * GiB,
        20 * GiB,
    )
    assert data_disk.backup == types.DiskBackup.NONE

    inline = followed[0].disk_attachments
    assert [a.disk.alias for a in inline] == ["web01_os", "web01_data"]
    assert inline[1].disk.provisioned_size == 20 * GiB
    assert len(all_disks) == 7
    # db01's direct LUN and shareable disk, as the engine writes them (API-NOTES § 3).
    by_alias = {d.alias: d for d in all_disks}
    lun = by_alias["db01_lun"]
    assert lun.storage_type == types.DiskStorageType.LUN
    assert lun.provisioned_size is None and lun.format is None and not lun.storage_domains
    assert lun.lun_storage.logical_units[0].size == 100 * GiB
    assert by_alias["db01_quorum"].shareable is True
    assert by_alias["db01_os"].shareable is False


async def test_wrong_password_is_auth_error(engine: FakeEngine) -> None:
    def check(conn: sdk.Connection) -> None:
        conn.system_service().vms_service().list()

    with pytest.raises(sdk.AuthError, match="access_denied"):
        await with_sdk(engine, check, password="wrong")
    assert len(engine.sessions) == 0


async def test_expired_token_is_renewed_once(engine: FakeEngine) -> None:
    conn = await asyncio.to_thread(connect, engine)
    try:
        vms = conn.system_service().vms_service()
        first = await asyncio.to_thread(vms.list)
        engine.sessions.revoke_all()  # on the loop, as Sessions requires: the token "expired"
        second = await asyncio.to_thread(vms.list)  # 401, SDK logs in again, retries once
    finally:
        await asyncio.to_thread(conn.close)
    assert len(first) == len(second) == 3
    assert len(engine.sessions) == 0


async def test_request_without_token_is_401_fault(engine: FakeEngine) -> None:
    ctx = ssl.create_default_context(cafile=str(engine.ca_file))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{engine.url}/vms", ssl=ctx) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/xml"
            assert "<fault>" in await resp.text()
        headers = {"Authorization": "Bearer not-a-token"}
        async with http.get(f"{engine.url}/vms", ssl=ctx, headers=headers) as resp:
            assert resp.status == 401


async def test_unknown_ids_are_not_found(engine: FakeEngine) -> None:
    missing = lab_id("vm", "nosuchvm")

    def get_vm(conn: sdk.Connection) -> None:
        conn.system_service().vms_service().vm_service(missing).get()

    def get_disk(conn: sdk.Connection) -> None:
        conn.system_service().disks_service().disk_service(missing).get()

    def get_path(conn: sdk.Connection) -> None:
        conn.system_service().affinity_labels_service().list()  # not served by the lab

    def get_template(conn: sdk.Connection) -> None:
        conn.system_service().templates_service().template_service(missing).get()

    def get_disk_snapshots(conn: sdk.Connection) -> None:
        disk = conn.system_service().disks_service().disk_service(missing)
        disk.disk_snapshots_service().list()

    for fn in (get_vm, get_disk, get_path, get_template, get_disk_snapshots):
        with pytest.raises(sdk.NotFoundError):
            await with_sdk(engine, fn)


async def test_protocol_errors_are_xml_faults(engine: FakeEngine) -> None:
    token = await asyncio.to_thread(lambda: _login_token(engine))
    ctx = ssl.create_default_context(cafile=str(engine.ca_file))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{engine.url}/clusters", ssl=ctx, headers=auth) as resp:
            assert (resp.status, resp.content_type) == (405, "application/xml")
        headers = {**auth, "Version": "3"}
        async with http.get(engine.url, ssl=ctx, headers=headers) as resp:
            assert (resp.status, resp.content_type) == (400, "application/xml")
        async with http.get(f"{engine.url}/vms", ssl=ctx, headers=auth) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/xml"


def _login_token(engine: FakeEngine) -> str:
    conn = connect(engine)
    try:
        return str(conn.authenticate())
    finally:
        conn.close(logout=False)  # keep the token alive for the raw requests


async def test_http_5xx_refuses_the_next_authenticated_requests(engine: FakeEngine) -> None:
    engine.faults.http_5xx = 2
    engine.faults.slow_ms = 1  # every response late; the answers stay the same

    def run(conn: sdk.Connection) -> int:
        vms = conn.system_service().vms_service()
        for _ in range(2):
            with pytest.raises(sdk.Error, match=r"Faults\.http_5xx") as caught:
                vms.list()
            assert caught.value.code == 503
        return len(vms.list())

    assert await with_sdk(engine, run) > 0  # the SSO login did not count
    assert engine.faults.http_5xx == 0
