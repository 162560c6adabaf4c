"""``tessera policies --show-selection`` and ``tessera backup vm --dry-run`` against the lab
(issue 16, checks before the night): both ask the engine what a run would take — the VMs a
policy selects (globs, ``exclude``), each VM's flow, the disks it would read and those it
would skip with the reason (direct LUN, shareable) — and create nothing on the engine (no
backup, checkpoint, snapshot, transfer, disk or attachment) and nothing in the store."""

import json
from pathlib import Path
from typing import Any

import pytest

from plugins.lab.engine.server import FakeEngine
from tests.ovirt.test_backup_api_flow import tessera
from tests.ovirt.test_unreadable_disks import DM, lab

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture: vm1 (an OS disk, a shareable disk, a direct LUN) and DM


def engine_state(engine: FakeEngine) -> dict[str, Any]:
    """Everything a backup would create or change on the lab engine."""
    a = engine.activity
    inv = engine.inventory
    return {
        "backups": dict(a.backups),
        "checkpoints": dict(a.checkpoints),
        "transfers": dict(a.transfers),
        "snapshots": dict(a.snapshots),
        "images": set(a.created_images),
        "disks": set(inv.disks),
        "vms": {vm.id: vm.attachments for vm in inv.vms.values()},
    }


def write_policy(config: Path, text: str) -> None:
    policies = config.parent / "policies.d"
    policies.mkdir(exist_ok=True)
    (policies / "nightly.yaml").write_text(text)


async def test_show_selection_lists_vms_flows_and_skipped_disks(
    lab: tuple[FakeEngine, Path, dict[str, Path]],
) -> None:
    engine, config, _ = lab
    write_policy(
        config,
        "name: nightly\nselection:\n  vms: ['vm*', 'tessera-*']\n  exclude: [tessera-dm]\n",
    )
    before = engine_state(engine)
    code, out, err = await tessera("policies", "--show-selection", "nightly", "--config", config)
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "policy nightly: 1 of the 2 VMs of engine lab"
    assert lines[1].startswith("VM vm1 (cluster Default, up): flow backup-api, consistency ")
    assert f"VM {DM}" not in out  # excluded
    read = [line.split() for line in lines if line.startswith("  read ")]
    assert read == [["read", "vm1_os", "160.0", "MiB", "incremental"]]
    skipped = {line.split()[1]: line for line in lines if line.startswith("  skip ")}
    assert set(skipped) == {"vm1_quorum", "vm1_lun"}
    assert "a shareable disk" in skipped["vm1_quorum"]
    assert "a lun disk" in skipped["vm1_lun"]

    # snapshot-attach: each VM's flow, and the DataMover checked as the run would.
    write_policy(config, "name: nightly\nselection:\n  vms: [vm1]\nflow: snapshot-attach\n")
    code, out, err = await tessera(
        "policies", "--show-selection", "nightly", "--config", config, "--json"
    )
    assert code == 0, out + err
    doc = json.loads(out)
    (vm,) = doc["vms"]
    assert (vm["vm_name"], vm["flow"]) == ("vm1", "snapshot-attach")
    assert [d["name"] for d in vm["disks"]] == ["vm1_os"]
    assert vm["disks"][0]["read"].startswith("full: a snapshot flow")
    assert {name for name, _ in vm["skipped"]} == {"vm1_quorum", "vm1_lun"}
    assert engine_state(engine) == before

    code, out, err = await tessera("policies", "--show-selection", "weekly", "--config", config)
    assert code == 2 and "no policy 'weekly' (policies: nightly)" in err, out + err


async def test_backup_dry_run_creates_nothing_and_says_what_it_would_do(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]]
) -> None:
    engine, config, _ = lab
    store = tmp_path / "store"
    before = engine_state(engine)
    for flow in ("auto", "snapshot-imageio", "snapshot-attach"):
        code, out, err = await tessera(
            "backup", "vm", "vm1", "--config", config, "--flow", flow, "--dry-run"
        )
        assert code == 0, out + err
        assert out.startswith("dry run: nothing was read, written or created\n"), out
        shown = "backup-api" if flow == "auto" else flow
        assert f"VM vm1 (cluster Default, up): flow {shown}, level full, consistency " in out
        assert "note: first backup of this VM: full instead of incremental" in out
        assert "skip  vm1_lun" in out and "skip  vm1_quorum" in out
        assert f"would add a snapshot to store {store} (it holds 0 of this VM)" in out
        assert engine_state(engine) == before, flow
    assert not list((store / "snapshots").iterdir())
    assert not list((store / "journal").glob("*.json"))

    code, out, err = await tessera("backup", "vm", "vm9", "--config", config, "--dry-run")
    assert code == 2 and "no VM matches 'vm9'" in err, out + err

    # After a real backup, the dry run names the parent an incremental would start from.
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config)
    assert code == 0, out + err
    code, out, err = await tessera("snapshots", "--config", config, "--json")
    (snap,) = json.loads(out)
    after = engine_state(engine)
    code, out, err = await tessera("backup", "vm", "vm1", "--config", config, "--dry-run")
    assert code == 0, out + err
    assert f"level incremental from parent {snap['id']}" in out
    assert "read  vm1_os" in out and "incremental" in out
    assert "(it holds 1 of this VM)" in out
    assert engine_state(engine) == after
