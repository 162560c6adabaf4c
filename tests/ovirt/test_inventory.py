"""``plugins.ovirt.inventory`` against the lab's fake engine (demo seed), through the real SDK."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.core.errors import ConfigError
from engine.util.retry import RetryPolicy
from plugins.lab.engine import FakeEngine, demo_seed, lab_id
from plugins.ovirt import inventory
from plugins.ovirt.client import EngineClient, EngineConfig, EngineNotFound
from plugins.ovirt.inventory import (
    DataMoverAmbiguous,
    DataMoverNotFound,
    DiskRef,
    VmRef,
    datamover_vm,
    vm_disks,
    vms,
)

GiB = 1024**3


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[FakeEngine]:
    async with FakeEngine(demo_seed(), tmp_path) as fake:
        yield fake


@pytest.fixture
async def client(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[EngineClient]:
    password_file = tmp_path / "engine.password"
    password_file.write_text(engine.password + "\n")
    config = EngineConfig(engine.url, engine.username, password_file, engine.ca_file)
    policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001)
    async with EngineClient(config, retry_policy=policy) as c:
        yield c


def names(found: list[VmRef]) -> list[str]:
    return [v.name for v in found]


async def test_clusters_hosts_storage_domains(client: EngineClient) -> None:
    clusters = await inventory.clusters(client)
    assert [(c.name, c.version) for c in clusters] == [
        ("Default", (4, 7)),
        ("Prod", (4, 6)),
    ]  # both backup modes
    assert clusters[0].id == lab_id("cluster", "Default")
    assert clusters[0].data_center_id == lab_id("datacenter", "Default")

    hosts = await inventory.hosts(client)
    assert [(h.name, h.cluster_id, h.status) for h in hosts] == [
        ("host1", lab_id("cluster", "Default"), "up"),
        ("host2", lab_id("cluster", "Prod"), "up"),
    ]

    sds = await inventory.storage_domains(client)
    assert [(s.name, s.type, s.master, s.storage_type, s.block) for s in sds] == [
        ("data1", "data", True, "nfs", False),
        ("data2", "data", False, "nfs", False),
        ("block1", "data", False, "iscsi", True),
    ]
    assert sds[0].available == 500 * GiB


async def test_vms_listed_with_cluster_status_tags_and_disks(client: EngineClient) -> None:
    found = await vms(client)
    assert names(found) == ["web01", "web02", "db01"]
    web01, web02, db01 = found
    assert (web01.id, web01.cluster, web01.status, web01.tags) == (
        lab_id("vm", "web01"),
        "Default",
        "up",
        ("gold",),
    )
    assert web01.host_id == lab_id("host", "host1")
    assert (web02.status, web02.host_id, web02.tags) == ("down", None, ())
    assert (db01.cluster, db01.cluster_id, db01.tags) == (
        "Prod",
        lab_id("cluster", "Prod"),
        ("silver",),
    )
    assert [d.name for d in web01.disks] == ["web01_os", "web01_data"]
    assert [d.name for d in db01.disks] == ["db01_os", "db01_data", "db01_quorum", "db01_lun"]
    assert [d.skip_reason is None for d in db01.disks] == [True, True, False, False]


async def test_vm_search_by_cluster_name_glob_and_tag(client: EngineClient) -> None:
    assert names(await vms(client, cluster="Prod")) == ["db01"]
    assert names(await vms(client, cluster="Default")) == ["web01", "web02"]
    assert names(await vms(client, cluster="NoSuchCluster")) == []
    assert names(await vms(client, name_glob="web*")) == ["web01", "web02"]
    assert names(await vms(client, name_glob="web0[2]")) == ["web02"]  # client-side only
    assert names(await vms(client, name_glob="?b01")) == ["db01"]
    assert names(await vms(client, name_glob="WEB*")) == []  # case-sensitive, like fnmatchcase
    assert names(await vms(client, name_glob="web01")) == ["web01"]
    assert names(await vms(client, tag="gold")) == ["web01"]
    assert names(await vms(client, tag="silver")) == ["db01"]
    assert names(await vms(client, cluster="Default", tag="gold")) == ["web01"]
    assert names(await vms(client, cluster="Prod", name_glob="web*")) == []


async def test_one_vm_and_unknown_vm(client: EngineClient) -> None:
    vm_id = lab_id("vm", "db01")
    got = await inventory.vm(client, vm_id)
    assert (got.name, got.cluster, got.status) == ("db01", "Prod", "up")

    missing = lab_id("vm", "nosuchvm")
    with pytest.raises(EngineNotFound) as info:
        await inventory.vm(client, missing)
    assert missing in str(info.value)
    with pytest.raises(EngineNotFound, match=missing):
        await vm_disks(client, missing)


async def test_vm_disks_match_the_seed(client: EngineClient) -> None:
    web01 = await vm_disks(client, lab_id("vm", "web01"))
    assert web01 == [
        DiskRef(
            id=lab_id("disk", "web01_os"),
            name="web01_os",
            provisioned_size=10 * GiB,
            actual_size=0,
            format="cow",
            interface="virtio_scsi",
            bootable=True,
            active=True,
            incremental=True,
            storage_domain_id=lab_id("sd", "data1"),
            image_id=lab_id("volume", "web01_os"),
            status="ok",
        ),
        DiskRef(
            id=lab_id("disk", "web01_data"),
            name="web01_data",
            provisioned_size=20 * GiB,
            actual_size=20 * GiB,
            format="raw",
            interface="virtio_scsi",
            bootable=False,
            active=True,
            incremental=False,
            storage_domain_id=lab_id("sd", "data1"),
            image_id=lab_id("volume", "web01_data"),
            status="ok",
        ),
    ]
    web02 = await vm_disks(client, lab_id("vm", "web02"))
    assert [(d.name, d.interface, d.bootable, d.format) for d in web02] == [
        ("web02_os", "virtio", True, "cow")
    ]
    db01 = await vm_disks(client, lab_id("vm", "db01"))
    assert [(d.name, d.provisioned_size, d.interface, d.storage_domain_id) for d in db01] == [
        ("db01_os", 8 * GiB, "virtio_scsi", lab_id("sd", "data2")),
        ("db01_data", 50 * GiB, "sata", lab_id("sd", "data2")),
        ("db01_quorum", 1 * GiB, "virtio_scsi", lab_id("sd", "data2")),
        ("db01_lun", 100 * GiB, "virtio_scsi", None),  # the LUN's size; no domain
    ]
    assert [(d.storage_type, d.shareable) for d in db01] == [
        ("image", False),
        ("image", False),
        ("image", True),
        ("lun", False),
    ]


async def test_datamover_by_name(client: EngineClient) -> None:
    found = await datamover_vm(client, name="db01")
    assert (found.id, found.name) == (lab_id("vm", "db01"), "db01")
    both = await datamover_vm(client, name="db01", host_uuid=lab_id("vm", "db01").upper())
    assert both.id == found.id

    with pytest.raises(DataMoverNotFound, match="'nosuchvm'"):
        await datamover_vm(client, name="nosuchvm")
    with pytest.raises(DataMoverNotFound, match="'web0'"):
        await datamover_vm(client, name="web0")  # a prefix is not a match
    with pytest.raises(DataMoverNotFound):
        await datamover_vm(client, name="db01", host_uuid=lab_id("vm", "web01"))


async def test_datamover_by_host_uuid(client: EngineClient) -> None:
    vm_id = lab_id("vm", "web02")
    found = await datamover_vm(client, host_uuid=vm_id.upper() + "\n")  # as sysfs prints it
    assert (found.id, found.name) == (vm_id, "web02")

    unknown = lab_id("vm", "not-a-vm")
    with pytest.raises(DataMoverNotFound, match=unknown):
        await datamover_vm(client, host_uuid=unknown)


async def test_datamover_reads_product_uuid(
    client: EngineClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    product_uuid = tmp_path / "product_uuid"
    product_uuid.write_text(lab_id("vm", "web01").upper() + "\n")
    monkeypatch.setattr(inventory, "PRODUCT_UUID_PATH", product_uuid)
    assert (await datamover_vm(client)).name == "web01"

    monkeypatch.setattr(inventory, "PRODUCT_UUID_PATH", tmp_path / "missing")
    with pytest.raises(ConfigError, match="missing"):
        await datamover_vm(client)


def test_several_datamover_candidates_are_an_error() -> None:
    def ref(name: str) -> VmRef:
        return VmRef(lab_id("vm", name), name, None, None, "up", None, (), ())

    with pytest.raises(DataMoverAmbiguous) as info:
        inventory._pick_one([ref("a"), ref("b")], "https://engine/ovirt-engine/api", "UUID x")
    assert "2 VMs" in str(info.value)
    assert "a (" in str(info.value)
    assert "b (" in str(info.value)
    assert inventory._pick_one([ref("a")], "u", "c").name == "a"


def test_search_terms() -> None:
    assert inventory._search_term("name", "web*") == "name=web*"
    assert inventory._search_term("name", "web0[2]") is None
    assert inventory._search_term("cluster", "My Cluster") == 'cluster="My Cluster"'
    assert inventory._search_term("tag", 'say "hi"') is None
