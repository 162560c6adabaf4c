"""Two sites, two daemons, two lab engines on loopback: site A backs a VM up by policy and
pushes each snapshot to site B over mutual TLS; site B receives it into its own store and
keeps a powered-off standby copy of the VM in its own engine, refreshed after each replica
with only the changed slots. Driven through each daemon's API by the operator CLI."""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.core.units import MiB
from engine.replication.tls import init_ca, issue
from plugins.lab.disks import DiskRequest, build_disks
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.imageio import ImageioDaemon
from tests.e2e.test_daemon import Daemon, add_config, tessera
from tests.integration.images import identical, qemu_io, reference

pytestmark = pytest.mark.integration

SEED_A = Seed(vms=(VmSeed(name="web01", disks=(DiskSeed("web01_os", 128 * MiB, bootable=True),)),))
SEED_B = Seed(vms=(VmSeed(name="dr-probe", disks=(DiskSeed("probe_os", 128 * MiB),)),))


@dataclass
class Site:
    name: str
    engine: FakeEngine
    config: Path
    images: dict[str, Path]


async def engine_of(
    tmp: Path, seed: Seed, imageio: ImageioDaemon
) -> tuple[FakeEngine, dict[str, Path]]:
    engine_dir = tmp / "engine"
    engine_dir.mkdir()
    probe = FakeEngine(seed, engine_dir)
    disks = {d.alias: d for d in probe.inventory.disks.values()}
    images = {alias: tmp / f"{alias}.qcow2" for alias in disks}
    await build_disks(
        [
            DiskRequest(a, p, "qcow2", disks[a].provisioned_size, template=True, vm=a.split("_")[0])
            for a, p in images.items()
        ],
        tmp / "work",
    )
    engine = FakeEngine(
        seed, engine_dir, images={disks[a].id: p for a, p in images.items()}, imageio=imageio
    )
    return engine, images


def base_config(tmp: Path, engine: FakeEngine, seed: Seed) -> str:
    (tmp / "engine-password").write_text(seed.password + "\n")
    return (
        f"stores:\n  - name: main\n    path: {tmp / 'store'}\n"
        f"engines:\n  - name: lab\n    url: {engine.url}\n    username: {seed.username}\n"
        f"    password_file: {tmp / 'engine-password'}\n    ca_file: {engine.ca_file}\n"
        f"api:\n  socket: {tmp / 'api.sock'}\n"
        f"scheduler:\n  state_file: {tmp / 'scheduler.json'}\n"
    )


@pytest.fixture
async def sites(tmp_path: Path) -> AsyncIterator[tuple[Site, Site]]:
    pki = tmp_path / "pki"
    init_ca(pki / "ca")
    a_tls = issue(pki / "ca", "site-a", pki / "a", ips=["127.0.0.1"])
    b_tls = issue(pki / "ca", "site-b", pki / "b", ips=["127.0.0.1"])
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    async with (
        ImageioDaemon(base_dir=a_dir) as imageio_a,
        ImageioDaemon(base_dir=b_dir) as imageio_b,
    ):
        engine_a, images_a = await engine_of(a_dir, SEED_A, imageio_a)
        engine_b, images_b = await engine_of(b_dir, SEED_B, imageio_b)
        async with engine_a, engine_b:
            code, out = await tessera("store", "init", a_dir / "store")
            assert code == 0, out
            code, out = await tessera(
                "peer", "init-store", b_dir / "store", "--from-store", a_dir / "store"
            )
            assert code == 0, out
            port, port_a = free_port(), free_port()
            config_a = a_dir / "config.yaml"
            config_a.write_text(base_config(a_dir, engine_a, SEED_A))
            add_config(
                config_a,
                f"peers:\n  - name: site-b\n    url: https://127.0.0.1:{port}\n"
                f"    cert_file: {a_tls.cert}\n    key_file: {a_tls.key}\n"
                f"    ca_file: {a_tls.ca}\n    streams: 2\n"
                # A serves pulls (and could receive replicas) on its own peer listener
                f"peer_server:\n  listen: 127.0.0.1:{port_a}\n  cert_file: {a_tls.cert}\n"
                f"  key_file: {a_tls.key}\n  ca_file: {a_tls.ca}\n",
            )
            (a_dir / "policies.d").mkdir()
            (a_dir / "policies.d" / "nightly.yaml").write_text(
                "name: nightly\nselection: {vms: [web01]}\nschedule: daily 02:00\n"
                "replication: [{peer: site-b}]\n"
            )
            config_b = b_dir / "config.yaml"
            config_b.write_text(base_config(b_dir, engine_b, SEED_B))
            add_config(
                config_b,
                f"peer_server:\n  listen: 127.0.0.1:{port}\n  cert_file: {b_tls.cert}\n"
                f"  key_file: {b_tls.key}\n  ca_file: {b_tls.ca}\n"
                # site A as B knows it: B asks it for pulls
                f"peers:\n  - name: site-a\n    url: https://127.0.0.1:{port_a}\n"
                f"    cert_file: {b_tls.cert}\n    key_file: {b_tls.key}\n"
                f"    ca_file: {b_tls.ca}\n",
            )
            (b_dir / "policies.d").mkdir()
            (b_dir / "policies.d" / "dr.yaml").write_text(
                "name: dr\nselection: {vms: [web01]}\n"
                "standby: {peer: site-a, cluster: Default, storage_domain: data1}\n"
            )
            (b_dir / "policies.d" / "pull.yaml").write_text(
                "name: pull-dr\nselection: {vms: [web*]}\n"
                "replication: [{peer: site-a, mode: pull}]\n"
            )
            yield (
                Site("a", engine_a, config_a, images_a),
                Site("b", engine_b, config_b, images_b),
            )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def jobs_of(config: Path) -> list[dict[str, Any]]:
    code, out = await tessera("jobs", "--config", config, "--json")
    assert code == 0, out
    jobs: list[dict[str, Any]] = json.loads(out)
    return jobs


async def until(config: Path, kind: str, count: int) -> list[dict[str, Any]]:
    """The jobs of ``kind`` once ``count`` of them have ended."""
    for _ in range(900):
        jobs = [j for j in await jobs_of(config) if j["kind"] == kind]
        if sum(j["finished"] is not None for j in jobs) >= count:
            return jobs
        await asyncio.sleep(0.2)
    raise AssertionError(f"{kind} jobs did not end: {await jobs_of(config)}")


async def test_policy_pushes_to_the_peer_which_keeps_a_standby(
    tmp_path: Path, sites: tuple[Site, Site]
) -> None:
    a, b = sites
    daemon_a = Daemon(a.config, tmp_path / "a.log")
    daemon_b = Daemon(b.config, tmp_path / "b.log")
    try:
        await daemon_b.start()
        await daemon_a.start()
        ref0 = reference(a.images["web01_os"], tmp_path / "t0.raw")
        code, out = await tessera("policies", "--config", a.config, "--run", "nightly")
        assert code == 0, out
        (push,) = await until(a.config, "replicate", 1)
        assert push["state"] == "succeeded", push
        (first,) = await until(b.config, "standby", 1)
        assert first["state"] == "succeeded", first
        assert first["summary"]["mode"] == "full"
        standby = next(v for v in b.engine.inventory.vms.values() if v.name == "web01-standby")
        (attachment,) = standby.attachments
        assert identical(ref0, b.engine.activity.images[attachment.disk_id])

        code, out = await tessera("replication", "--config", a.config, "--json")
        assert code == 0, out
        (peer,) = json.loads(out)["peers"]
        assert peer["peer"] == "site-b" and len(peer["vms"]) == 1

        # the guest writes; the next run sends only new chunks and refreshes changed slots
        qemu_io(a.images["web01_os"], "write -P 0x61 3M 4k", "write -P 0x62 90M 64k")
        ref1 = reference(a.images["web01_os"], tmp_path / "t1.raw")
        code, out = await tessera("policies", "--config", a.config, "--run", "nightly")
        assert code == 0, out
        pushes = await until(a.config, "replicate", 2)
        assert pushes[-1]["state"] == "succeeded", pushes[-1]
        assert pushes[-1]["summary"]["chunks_sent"] <= 2, pushes[-1]["summary"]
        refreshes = await until(b.config, "standby", 2)
        second = refreshes[-1]
        assert second["state"] == "succeeded", second
        assert second["summary"]["mode"] == "refresh"
        assert 1 <= second["summary"]["slots_written"] <= 2
        assert identical(ref1, b.engine.activity.images[attachment.disk_id])
    finally:
        for daemon in (daemon_a, daemon_b):
            await daemon.kill()


async def test_a_pull_policy_asks_the_peer_to_push(
    tmp_path: Path, sites: tuple[Site, Site]
) -> None:
    a, b = sites
    daemon_a = Daemon(a.config, tmp_path / "a.log")
    daemon_b = Daemon(b.config, tmp_path / "b.log")
    try:
        await daemon_a.start()
        await daemon_b.start()
        ref = reference(a.images["web01_os"], tmp_path / "t0.raw")
        code, out = await tessera("backup", "vm", "web01", "--config", a.config, "--level", "full")
        assert code == 0, out  # by hand: no policy, so nothing is pushed
        assert not [j for j in await jobs_of(a.config) if j["kind"] == "replicate"]

        code, out = await tessera("policies", "--config", b.config, "--run", "pull-dr")
        assert code == 0, out
        (push,) = await until(a.config, "replicate", 1)
        assert push["state"] == "succeeded" and push["params"]["peer"] == "site-b", push
        (standby,) = await until(b.config, "standby", 1)
        assert standby["state"] == "succeeded", standby
        vm = next(v for v in b.engine.inventory.vms.values() if v.name == "web01-standby")
        assert identical(ref, b.engine.activity.images[vm.attachments[0].disk_id])
        assert [e["peer"] for e in daemon_a.events("pull.requested")] == ["site-b"]
    finally:
        for daemon in (daemon_a, daemon_b):
            await daemon.kill()
