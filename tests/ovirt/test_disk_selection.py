"""Single disks: a policy's ``selection.disks``, ``tessera backup vm --disk`` (names/globs of
disk aliases, or disk ids) against the lab. Only the chosen disks are put in the backup
request, snapshot and transfers and stored; the others are skipped with the reason ``not
selected (disks: …)``, recorded in the snapshot (tag ``skipped_disks``) as direct LUNs and
shareable disks are. A selection that takes none of a VM's disks fails that VM's backup
before anything is created on the engine. Changing the selection between runs keeps every
incremental right: a disk that was not in the parent snapshot is read in full, never
against a parent that lacks it; each restore is compared with ``qemu-img compare``."""

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from engine.core.units import MiB
from engine.sources.selection import NoDiskSelected
from plugins.lab.disks import DiskRequest
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed, lab_id
from plugins.lab.imageio import ImageioDaemon
from plugins.ovirt.base import OvirtSourceBase
from plugins.ovirt.client import EngineClient
from plugins.ovirt.inventory import DiskRef, VmRef
from tests.daemon_setup import running
from tests.integration.images import identical, qemu_io, reference
from tests.lab_disks import build_once
from tests.ovirt.test_backup_api_flow import tessera
from tests.ovirt.test_plan import engine_state

pytestmark = pytest.mark.integration

DM = "tessera-dm"
SEED = Seed(
    vms=(
        VmSeed(
            name="vm1",
            disks=(
                DiskSeed("vm1_os", 160 * MiB, bootable=True),
                DiskSeed("vm1_data", 128 * MiB),  # qcow2 with checkpoints, as the OS disk
                DiskSeed("vm1_scratch", 128 * MiB, format="raw", sparse=False, backup="none"),
            ),
        ),
        VmSeed(name=DM, disks=(DiskSeed(f"{DM}_os", 16 * MiB, bootable=True),)),
    )
)
OS, DATA, SCRATCH = (lab_id("disk", a) for a in ("vm1_os", "vm1_data", "vm1_scratch"))
Lab = tuple[FakeEngine, Path, dict[str, Path]]
NEW_DISK = "disk not in the parent snapshot: full read"


@pytest.fixture
async def lab(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    images = {
        "vm1_os": tmp_path / "vm1_os.qcow2",
        "vm1_data": tmp_path / "vm1_data.qcow2",
        "vm1_scratch": tmp_path / "vm1_scratch.raw",
    }
    await build_once(
        tmp_path_factory,
        [
            DiskRequest("vm1_os", images["vm1_os"], "qcow2", 160 * MiB, template=True, vm="vm1"),
            DiskRequest("vm1_data", images["vm1_data"], "qcow2", 128 * MiB, vm="vm1"),
            DiskRequest("vm1_scratch", images["vm1_scratch"], "raw", 128 * MiB, vm="vm1"),
        ],
    )
    (tmp_path / "engine").mkdir()
    async with ImageioDaemon(base_dir=tmp_path) as daemon:
        engine = FakeEngine(
            SEED,
            tmp_path / "engine",
            images={lab_id("disk", a): p for a, p in images.items()},
            imageio=daemon,
            datamover=DM,
            devices_dir=tmp_path / "devices",
        )
        async with engine:
            (tmp_path / "engine-password").write_text(SEED.password + "\n")
            (tmp_path / "pass").write_text("flow-test\n")  # tessera()'s TESSERA_PASSPHRASE
            config = tmp_path / "config.yaml"
            config.write_text(
                "stores:\n"
                f"  - name: main\n    path: {tmp_path / 'store'}\n"
                f"    passphrase_file: {tmp_path / 'pass'}\n"
                "engines:\n"
                f"  - name: lab\n    url: {engine.url}\n    username: {SEED.username}\n"
                f"    password_file: {tmp_path / 'engine-password'}\n"
                f"    ca_file: {engine.ca_file}\n"
                f"datamover:\n  vm_name: {DM}\n  by_id_dir: {tmp_path / 'devices' / 'by-id'}\n"
                "  device_timeout: 30\n"
                f"api:\n  socket: {tmp_path / 'api.sock'}\n"
                f"scheduler:\n  state_file: {tmp_path / 'scheduler.json'}\n"
            )
            code, _, err = await tessera("store", "init", tmp_path / "store")
            assert code == 0, err
            yield engine, config, images


def write_policy(config: Path, disks: str) -> None:
    policies = config.parent / "policies.d"
    policies.mkdir(exist_ok=True)
    (policies / "nightly.yaml").write_text(
        f"name: nightly\nselection:\n  vms: [vm1]\n  disks: {disks}\n"
    )


async def snapshots(config: Path) -> list[dict[str, Any]]:
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    assert code == 0, err
    found: list[dict[str, Any]] = json.loads(out)
    return found


async def restores_identical(tmp_path: Path, snap: dict[str, Any], ref: dict[str, Path]) -> None:
    """Restore ``snap`` as local images; each equals its reference (``qemu-img compare``)."""
    out_dir = tmp_path / f"restored-{snap['id']}"
    out_dir.mkdir()
    code, out, err = await tessera(
        "restore", snap["id"], "--store", tmp_path / "store", "--to", out_dir
    )
    assert code == 0, out + err
    for disk in snap["disks"]:
        restored = next(out_dir.glob(f"{disk['name']}.*"))
        assert identical(ref[disk["name"]], restored), (snap["id"], disk["name"])


async def test_a_policy_backs_up_only_the_disks_its_selection_takes(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    write_policy(config, "['*_os']")
    ref = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}

    # What a run would take, shown first: the other disks skipped as not selected.
    before = engine_state(engine)
    code, out, err = await tessera("policies", "--show-selection", "nightly", "--config", config)
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("  read ")] == ["vm1_os"]
    skipped = {line.split()[1]: line for line in lines if line.startswith("  skip ")}
    assert set(skipped) == {"vm1_data", "vm1_scratch"}, out
    assert all(line.endswith("not selected (disks: *_os)") for line in skipped.values()), out
    assert engine_state(engine) == before

    async with running(config) as service:
        (policy,) = service.policies
        await service.run_policy(policy, datetime.now(UTC))
        (view,) = service.jobs.jobs()
    assert view.state == "succeeded", view.doc(lines=True)

    for b in engine.activity.backups.values():
        assert set(b.disk_ids) == {OS}
    assert {t.disk_id for t in engine.activity.transfers.values()} == {OS}
    (snap,) = await snapshots(config)
    assert [d["name"] for d in snap["disks"]] == ["vm1_os"]
    skipped_tag = snap["tags"]["skipped_disks"]
    assert "vm1_data: not selected (disks: *_os)" in skipped_tag, skipped_tag
    assert "vm1_scratch: not selected (disks: *_os)" in skipped_tag, skipped_tag
    await restores_identical(tmp_path, snap, ref)


@pytest.mark.parametrize("flow", ["backup-api", "snapshot-imageio", "snapshot-attach"])
async def test_backup_vm_disk_takes_names_globs_and_ids(
    tmp_path: Path, lab: Lab, flow: str
) -> None:
    engine, config, images = lab
    ref = {a: reference(p, tmp_path / f"ref-{a}.raw") for a, p in images.items()}
    choose = ("--disk", "*_data", "--disk", SCRATCH)
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--config", config, "--flow", flow, *choose, "--dry-run"
    )
    assert code == 0, out + err
    assert "skip  vm1_os" in out and "not selected (disks: *_data, " in out, out
    assert "read  vm1_data" in out and "read  vm1_scratch" in out, out

    code, out, err = await tessera(
        "backup", "vm", "vm1", "--config", config, "--flow", flow, *choose
    )
    assert code == 0, out + err
    assert "vm1_os skipped: not selected" in out, out
    activity = engine.activity
    for b in activity.backups.values():
        assert set(b.disk_ids) == {DATA, SCRATCH}
    assert {t.disk_id for t in activity.transfers.values()} <= {DATA, SCRATCH}
    (snap,) = await snapshots(config)
    assert sorted(d["name"] for d in snap["disks"]) == ["vm1_data", "vm1_scratch"]
    assert f"vm1_os: not selected (disks: *_data, {SCRATCH})" in snap["tags"]["skipped_disks"]
    await restores_identical(tmp_path, snap, ref)


async def test_a_selection_that_takes_no_disk_fails_before_anything_is_created(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, _ = lab
    before = engine_state(engine)
    why = "VM vm1: the disk selection (nope*, vm1_OS) takes none of its disks"
    code, out, err = await tessera(
        "backup", "vm", "vm1", "--config", config, "--disk", "nope*", "--disk", "vm1_OS",
        "--dry-run",
    )  # fmt: skip
    assert code == 1, out + err
    assert f"REFUSED: {why} (vm1_os, vm1_data, vm1_scratch)" in out, out

    for flow in ("backup-api", "snapshot-imageio", "snapshot-attach"):
        code, out, err = await tessera(
            "backup", "vm", "vm1", "--config", config, "--flow", flow,
            "--disk", "nope*", "--disk", "vm1_OS",
        )  # fmt: skip
        assert code == 1, out + err
        assert f"{why} (vm1_os, vm1_data, vm1_scratch)" in out + err, out + err
        assert engine_state(engine) == before, flow
    assert await snapshots(config) == []

    # Through a policy: the VM's job fails with the same error, the run goes on.
    write_policy(config, "[nope*]")
    code, out, err = await tessera("policies", "--show-selection", "nightly", "--config", config)
    assert code == 1 and "REFUSED: VM vm1: the disk selection (nope*)" in out, out + err
    async with running(config) as service:
        (policy,) = service.policies
        await service.run_policy(policy, datetime.now(UTC))
        (view,) = service.jobs.jobs()
    assert view.state == "failed"
    assert "the disk selection (nope*) takes none of its disks" in (view.error or "")
    assert engine_state(engine) == before


async def test_changing_the_selection_between_incrementals_restores_right(
    tmp_path: Path, lab: Lab
) -> None:
    """full {os} → incremental {all}: data and scratch are new, read in full; os dirty →
    incremental {data}: dirty from the last run → incremental {all}: os was not in the
    parent (the last run), so it is read in full although its bitmap chain goes on."""
    _, config, images = lab

    def change(step: int) -> dict[str, Path]:
        for alias in ("vm1_os", "vm1_data"):
            qemu_io(images[alias], f"write -P 0x{0x40 + step:x} {8 * step}M 64k")
        return {a: reference(p, tmp_path / f"t{step}-{a}.raw") for a, p in images.items()}

    async def backup(*args: str) -> dict[str, Any]:
        code, out, err = await tessera("backup", "vm", "vm1", "--config", config, *args)
        assert code == 0, out + err
        return (await snapshots(config))[-1]

    ref = change(1)
    snap = await backup("--level", "full", "--disk", "vm1_os")
    assert [d["name"] for d in snap["disks"]] == ["vm1_os"]
    await restores_identical(tmp_path, snap, ref)

    ref = change(2)
    snap = await backup()
    assert snap["level"] == "incremental"
    disks = {d["name"]: d["attributes"] for d in snap["disks"]}
    assert disks["vm1_os"]["read"] == "dirty"
    for new in ("vm1_data", "vm1_scratch"):  # the engine reports backup_mode=full too
        assert disks[new]["read"] == "full", disks
        assert disks[new]["fallback"] == NEW_DISK, disks
    await restores_identical(tmp_path, snap, ref)

    ref = change(3)
    snap = await backup("--disk", "vm1_data")
    disks = {d["name"]: d["attributes"] for d in snap["disks"]}
    assert list(disks) == ["vm1_data"] and disks["vm1_data"]["read"] == "dirty", disks
    await restores_identical(tmp_path, snap, ref)

    ref = change(4)
    snap = await backup()
    disks = {d["name"]: d["attributes"] for d in snap["disks"]}
    assert disks["vm1_os"]["read"] == "full", disks  # its bitmap chain went on meanwhile
    assert disks["vm1_os"]["fallback"] == NEW_DISK, disks
    assert disks["vm1_data"]["read"] == "dirty", disks
    await restores_identical(tmp_path, snap, ref)


def disk(name: str, **kw: Any) -> DiskRef:
    facts: dict[str, Any] = {
        "provisioned_size": MiB,
        "actual_size": None,
        "format": "cow",
        "interface": "virtio_scsi",
        "bootable": False,
        "active": True,
        "incremental": True,
        "storage_domain_id": "sd",
        "image_id": None,
        "status": "ok",
    }
    return DiskRef(id=f"id-{name}", name=name, **(facts | kw))


def source(disks: tuple[str, ...], *refs: DiskRef) -> OvirtSourceBase:
    vm = VmRef("vm-1", "web01", None, "Default", "up", None, (), refs)
    return OvirtSourceBase(cast(EngineClient, None), vm, {}, disks=disks)


def test_readable_disks_skips_what_the_selection_leaves_out() -> None:
    os, data, lun = disk("web01_os"), disk("web01_data"), disk("web01_lun", storage_type="lun")
    unplugged = disk("web01_old", active=False)
    disks, skipped = source((), os, data, lun, unplugged).readable_disks()
    assert [d.name for d in disks] == ["web01_os", "web01_data"]
    assert [name for name, _ in skipped] == ["web01_lun"]

    disks, skipped = source(("*_os", "id-web01_lun"), os, data, lun, unplugged).readable_disks()
    assert [d.name for d in disks] == ["web01_os"]
    reason = "not selected (disks: *_os, id-web01_lun)"
    assert dict(skipped)["web01_data"] == reason
    assert dict(skipped)["web01_old"] == reason  # noted, unlike an unplugged selected disk
    assert "lun" in dict(skipped)["web01_lun"]  # taken, but still no image to read

    with pytest.raises(NoDiskSelected, match=r"VM web01: .* \(nope\) takes none of its disks"):
        source(("nope",), os, data).readable_disks()
