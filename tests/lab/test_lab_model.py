"""The fake engine's pure parts: search language subset and seed validation."""

import pytest

from engine.core.errors import ConfigError
from plugins.lab.engine import DiskSeed, Inventory, Seed, VmSeed, demo_seed, lab_id
from plugins.lab.engine.search import SearchError, parse

FIELDS = ("name", "cluster", "status", "tag")
WEB = {"name": "web01", "cluster": "Default", "status": "up", "tag": ["gold", "x"]}
DB = {"name": "my db", "cluster": "Prod", "status": "down", "tag": []}


@pytest.mark.parametrize(
    ("query", "web", "db"),
    [
        (None, True, True),
        ("  ", True, True),
        ("name=web01", True, False),
        ("name=web*", True, False),
        ("name=*0*", True, False),
        ('name="my db"', False, True),
        ("name!=web01", False, True),
        ("cluster=Default and status=up", True, False),
        ("cluster=Default AND status=down", False, False),
        ("status=down or tag=gold", True, True),
        ("tag=gold", True, False),
        ("name=WEB01", False, False),
        ("name=a.b", False, False),  # regex characters are literal
    ],
)
def test_search_matches(query: str | None, web: bool, db: bool) -> None:
    q = parse(query, FIELDS)
    assert (q.matches(WEB), q.matches(DB)) == (web, db)


def test_search_case_insensitive() -> None:
    assert parse("name=WEB*", FIELDS, case_sensitive=False).matches(WEB)


@pytest.mark.parametrize("query", ["colour=red", "name=", "name=a and", "name=a xor name=b"])
def test_search_rejects(query: str) -> None:
    with pytest.raises(SearchError):
        parse(query, FIELDS)


def test_seed_ids_are_stable_and_references_resolve() -> None:
    inv = Inventory.from_seed(demo_seed())
    db = inv.vms[lab_id("vm", "db01")]
    assert inv.clusters[db.cluster_id].name == "Prod"
    assert [d.alias for d in inv.vm_disks(db)] == [
        "db01_os",
        "db01_data",
        "db01_quorum",
        "db01_lun",
    ]
    assert [d.snapable for d in inv.vm_disks(db)] == [True, True, False, False]
    assert inv.vms[lab_id("vm", "web02")].host_id is None  # down VMs run nowhere


@pytest.mark.parametrize(
    ("seed", "words"),
    [
        (Seed(vms=(VmSeed("a", cluster="Nope"),)), "Nope"),
        (Seed(vms=(VmSeed("a"), VmSeed("a"))), "duplicate"),
        (Seed(vms=(VmSeed("a", status="exploded"),)), "exploded"),
        (Seed(vms=(VmSeed("a", disks=(DiskSeed("d", 1, format="vmdk"),)),)), "vmdk"),
        (Seed(vms=(VmSeed("a", disks=(DiskSeed("d", 1, format="raw"),)),)), "incremental"),
    ],
)
def test_bad_seed_is_config_error(seed: Seed, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Inventory.from_seed(seed)
