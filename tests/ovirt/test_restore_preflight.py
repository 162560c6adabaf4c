"""The pre-flight of every restore into the engine (``plugins.ovirt.preflight``), against the
lab: a target the engine cannot take (no such cluster or storage domain, a domain in
maintenance or without room, the new name in use) fails before the first disk is created,
with one error listing every problem, through the imageio flow, the DataMover flow and a
standby's full run. The lab refuses the same targets itself, so each check is one the
engine would otherwise fail on late."""

import asyncio
import re
from dataclasses import replace
from pathlib import Path

import pytest

from engine.core.units import MiB
from plugins.lab.engine import lab_id
from tests.ovirt import test_attach_flow
from tests.ovirt.test_backup_api_flow import lab, tessera
from tests.ovirt.test_restore_vm import Lab, full_backup, view

pytestmark = pytest.mark.integration

__all__ = ["lab"]  # the fixture, shared with the backup-API flow test

DATA1 = lab_id("sd", "data1")


def problems(err: str) -> list[str]:
    """The listed problems of a ``RestoreTargetError`` in the command's stderr."""
    return re.findall(r"^\s+- (.+)$", err, re.M)


async def test_every_problem_is_listed_and_nothing_is_created(tmp_path: Path, lab: Lab) -> None:
    engine, config, images = lab
    snapshot_id, _ = await full_backup(config, tmp_path, images)
    inv = engine.inventory
    inv.storage_domains[DATA1] = replace(
        inv.storage_domains[DATA1], status="maintenance", available=100 * MiB
    )
    before = await asyncio.to_thread(view, engine)
    events = len(engine.activity.events)

    code, out, err = await tessera(
        "restore", snapshot_id, "--config", config, "--name", "vm1", "--cluster", "nosuch"
    )
    assert code == 2, out + err
    assert "restore of VM vm1: the target is not ready; nothing was created" in err
    vm1_id = before.vms["vm1"]["id"]
    found = problems(err)
    assert found[:3] == [
        "cluster nosuch does not exist (the engine has: Default)",
        f"a VM named vm1 already exists (id {vm1_id}); choose another name",
        "storage domain data1 is maintenance, not active",
    ], err
    # vm1_data is preallocated: its whole 192 MiB; vm1_os is thin: what its data needs.
    assert re.fullmatch(
        r"storage domain data1 has 100\.0 MiB free; the new disks need [\d.]+ MiB "
        r"\(vm1_os [\d.]+ (KiB|MiB), vm1_data 192\.0 MiB\)",
        found[3],
    ), found
    assert len(found) == 4, found
    after = await asyncio.to_thread(view, engine)
    assert after == before  # no disk, no VM, no transfer
    assert len(engine.activity.events) == events  # not even a refused attempt


async def test_an_unknown_domain_and_a_full_one_are_named(tmp_path: Path, lab: Lab) -> None:
    """Per-disk domains: the unknown one names the disks that want it; a domain that is
    active but too small is the only problem of the other."""
    engine, config, images = lab
    snapshot_id, _ = await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)
    code, out, err = await tessera(
        "restore", snapshot_id, "--config", config, "--storage-domain", "nosuch"
    )
    assert code == 2, out + err
    assert problems(err) == [
        "storage domain nosuch (for disk vm1_os, vm1_data) does not exist "
        "(the engine has: data1, block1)"
    ], err

    inv = engine.inventory
    inv.storage_domains[DATA1] = replace(inv.storage_domains[DATA1], available=150 * MiB)
    code, out, err = await tessera("restore", snapshot_id, "--config", config)
    assert code == 2, out + err
    (only,) = problems(err)
    assert only.startswith("storage domain data1 has 150.0 MiB free"), err
    assert await asyncio.to_thread(view, engine) == before

    # With room again, the same restore runs: the check refuses only what fails.
    inv.storage_domains[DATA1] = replace(inv.storage_domains[DATA1], available=1024 * MiB)
    code, out, err = await tessera("restore", snapshot_id, "--config", config)
    assert code == 0, out + err
    assert "vm1-restored" in (await asyncio.to_thread(view, engine)).vms


async def test_a_standby_in_a_missing_cluster_fails_before_any_disk(
    tmp_path: Path, lab: Lab
) -> None:
    engine, config, images = lab
    await full_backup(config, tmp_path, images)
    before = await asyncio.to_thread(view, engine)
    code, out, err = await tessera(
        "standby", "refresh", "vm1", "--config", config, "--cluster", "nosuch"
    )
    assert code == 2, out + err
    assert problems(err) == ["cluster nosuch does not exist (the engine has: Default)"], err
    assert await asyncio.to_thread(view, engine) == before


async def test_the_datamover_flow_checks_first(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with test_attach_flow.attach_lab(tmp_path, tmp_path_factory) as made:
        config = made.config("config.yaml")
        code, out, err = await tessera(
            "backup", "vm", "vm1", "--flow", "snapshot-attach", "--config", config
        )
        assert code == 0, out + err
        code, out, _ = await tessera("snapshots", "--config", config, "--json")
        snapshot_id = re.findall(r'"id": "([0-9a-f]+)"', out)[0]
        before = await made.view()
        code, out, err = await tessera(
            "restore", snapshot_id, "--config", config, "--flow", "attach", "--name", "vm1"
        )
        assert code == 2, out + err
        assert problems(err) == [
            f"a VM named vm1 already exists (id {lab_id('vm', 'vm1')}); choose another name"
        ], err
        assert await made.view() == before  # nothing attached to the DataMover, no disk
