"""The snapshot + imageio flow (flow 2) end to end: `tessera backup vm` against the lab (fake
engine + real ovirt-imageio + qemu-nbd over real qcow2/raw images), the OVF stored first,
restore into local images, byte comparison with the VM's disks at backup time, and no
snapshot or transfer left on the engine, the VM's data unchanged by the snapshot merge.

The CLI's ``--flow`` does not offer ``snapshot-imageio`` yet (engine/cli/main.py), so
``tessera_snapshot`` runs the real ``cli.main`` with ``cmd_backup_vm`` forcing that flow.
"""

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import ovirtsdk4 as sdk
import pytest

from engine.app.passphrase import resolve_passphrase
from engine.config.models import EngineSection
from engine.core.errors import ConfigError
from engine.core.units import MiB
from engine.io import qemu
from engine.store.chunk_store import Store
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.ovirt.recovery import recover
from plugins.ovirt.sources import vm_sources
from tests.integration.images import identical, qemu_io, reference
from tests.ovirt import test_backup_api_flow as base
from tests.ovirt.test_backup_api_flow import ROOT, SEED, tessera

pytestmark = pytest.mark.integration
lab = base.lab  # the fixture, shared


async def tessera_snapshot(*args: str | Path) -> tuple[int, str, str]:
    """``tessera backup vm ARGS`` with the snapshot-imageio flow."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.cli.main",
        "backup",
        "vm",
        "--flow",
        "snapshot-imageio",
        *map(str, args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TESSERA_PASSPHRASE": "flow-test"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def engine_state(engine: FakeEngine, vm_name: str) -> tuple[list[Any], list[str]]:
    """The VM's snapshots (types) and every transfer's phase, read with the SDK."""

    def read() -> tuple[list[Any], list[str]]:
        conn = sdk.Connection(
            url=engine.url,
            username=SEED.username,
            password=SEED.password,
            ca_file=str(engine.ca_file),
        )
        try:
            system = conn.system_service()
            vm = system.vms_service().list(search=f"name={vm_name}")[0]
            snaps = system.vms_service().vm_service(vm.id).snapshots_service().list()
            transfers = system.image_transfers_service().list()
            return [s.snapshot_type for s in snaps], [str(t.phase) for t in transfers]
        finally:
            conn.close()

    return await asyncio.to_thread(read)


async def test_snapshot_flow_twice_then_restore(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]]
) -> None:
    engine, config, images = lab
    refs = [{a: reference(p, tmp_path / f"t0-{a}.raw") for a, p in images.items()}]
    code, out, err = await tessera_snapshot("vm1", "--config", config, "--level", "full")
    assert code == 0, out + err

    qemu_io(images["vm1_os"], "write -P 0x42 10M 64k", "write -P 0x43 100M 1M")
    refs.append({a: reference(p, tmp_path / f"t1-{a}.raw") for a, p in images.items()})
    code, out, err = await tessera_snapshot("vm1", "--config", config)
    assert code == 0, out + err

    # The snapshot merge left the VM's data as it was (raw disks raw again).
    for alias, image in images.items():
        assert identical(refs[1][alias], image), alias
    assert (await qemu.info(images["vm1_data"]))["format"] == "raw"
    snaps, transfers = await engine_state(engine, "vm1")
    assert [str(s) for s in snaps] == ["active"], snaps
    assert transfers and all("finished_success" in p for p in transfers), transfers

    code, out, _ = await tessera("snapshots", "--config", config, "--json")
    docs = json.loads(out)
    assert len(docs) == 2
    for doc in docs:
        for disk in doc["disks"]:
            assert disk["attributes"]["consistency"] == "application"
            assert "read" not in disk["attributes"] or disk["attributes"]["read"] == "full"
    store = Store.open(
        tmp_path / "store",
        passphrase=resolve_passphrase(None, environ={"TESSERA_PASSPHRASE": "flow-test"}),
    )
    try:
        for doc in docs:
            m = store.manifest(doc["id"])
            assert m.config is not None and m.config.format == "ovf"
            ovf = store.read_chunk(bytes.fromhex(m.config.chunk_id)).decode()  # type: ignore[arg-type]
            assert "<ovf:Envelope" in ovf and "<Name>vm1</Name>" in ovf
    finally:
        store.close()

    for doc, ref in zip(docs, refs, strict=True):
        out_dir = tmp_path / f"restored-{doc['id']}"
        out_dir.mkdir()
        code, out, err = await tessera(
            "restore", doc["id"], "--store", tmp_path / "store", "--to", out_dir
        )
        assert code == 0, out + err
        for disk in doc["disks"]:
            restored = next(out_dir.glob(f"{disk['name']}.*"))
            assert identical(ref[disk["name"]], restored), disk["name"]


async def test_require_quiesce_refuses_a_vm_without_agent(tmp_path: Path) -> None:
    seed = Seed(
        vms=(
            VmSeed(
                name="quiet",
                guest_agent=False,
                disks=(DiskSeed("quiet_os", 16 * MiB),),
            ),
        )
    )
    (tmp_path / "password").write_text(seed.password)
    async with FakeEngine(seed, tmp_path) as engine:
        section = EngineSection(
            name="lab",
            url=engine.url,
            username=seed.username,
            password_file=tmp_path / "password",
            ca_file=engine.ca_file,
        )
        found = await vm_sources(section, ["quiet"], "snapshot-imageio", require_quiesce=True)
        recorded: list[str] = []

        async def remember(key: str, value: object) -> None:
            recorded.append(key)

        try:
            with pytest.raises(ConfigError, match="VM quiet: no responsive guest agent"):
                await found.sources[0].open(None, (), "tessera-x", 1, remember)
        finally:
            await found.client.close()
        assert recorded == []  # refused before anything was created
        assert not engine.activity.snapshots


async def test_recover_removes_what_a_killed_run_left(
    tmp_path: Path, lab: tuple[FakeEngine, Path, dict[str, Path]]
) -> None:
    engine, _, images = lab
    before = {a: reference(p, tmp_path / f"before-{a}.raw") for a, p in images.items()}
    section = EngineSection(
        name="lab",
        url=engine.url,
        username=SEED.username,
        password_file=tmp_path / "engine-password",
        ca_file=engine.ca_file,
    )
    found = await vm_sources(section, ["vm1"], "snapshot-imageio")
    journal: dict[str, object] = {}

    async def record(key: str, value: object) -> None:
        journal[key] = value

    try:
        session = await found.sources[0].open(None, (), "tessera-x", 1, record)
        assert session.vm.config is not None and session.vm.config_format == "ovf"
        # As if the process died while reading the first disk: its transfer (the only one
        # open: each is made when its disk is read) is left, nothing is closed.
        image = await session.disks[0].image()  # type: ignore[attr-defined]
        await image.close()
    finally:
        await found.client.close()
    assert set(journal) == {"engine", "snapshot", "transfers"}
    assert [str(s) for s in (await engine_state(engine, "vm1"))[0]] == ["active", "regular"]

    done = await recover(dict(journal), committed=False)
    assert len(done) == 2 and done[-1].startswith("removed snapshot")
    snaps, transfers = await engine_state(engine, "vm1")
    assert [str(s) for s in snaps] == ["active"]
    assert all("finished_success" in p for p in transfers), transfers
    for alias, image in images.items():
        assert identical(before[alias], image), alias
