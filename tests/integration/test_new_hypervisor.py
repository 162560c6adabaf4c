"""A new kind of source needs no edit to the daemon, the CLI or the API: an in-memory
hypervisor (``tests.memory``) registered by this test through the same seam the oVirt plugin
uses (``registry.register`` beside the entry points; the ``Hypervisor`` capability; an engine
section naming it with ``plugin:``) is listed, backed up and restored by the real
application layer and the real daemon, and its killed jobs reach its own ``recover``."""

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.app.backup import backup_vms
from engine.app.requests import VmBackupRequest, VmRestoreRequest
from engine.app.restore import plan_vm_restore, restore_vm
from engine.app.stores import open_for_jobs
from engine.config.loader import load_all
from engine.jobs.backup import BackupOutcome
from engine.jobs.states import State
from engine.sources import registry
from engine.sources.capabilities import Hypervisor
from engine.sources.registry import Plugin
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from tests.daemon_setup import CHUNK, daemon_config, running
from tests.helpers import realistic_bytes
from tests.memory import MemoryDisk, MemorySource, MemoryTargets, MemoryVm

pytestmark = pytest.mark.integration

PASSPHRASE = "new-hypervisor"


@dataclass
class MemorySet:
    sources: Sequence[MemorySource]
    closed: bool = False

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class MemoryRestorer:
    """A ``VmRestorer``: disks into ``MemoryTargets``, the "VM" a record of them."""

    name: str
    ovf: str | None
    targets: MemoryTargets = field(default_factory=MemoryTargets)
    vm: Any = None

    def make_target(self, entry: DiskEntry, record: Any) -> Any:
        return self.targets.make_target(entry, record)

    async def create_vm(self) -> object:
        self.vm = type("Vm", (), {"id": f"mem-{self.name}", "name": self.name})()
        return self.vm


@dataclass
class MemoryHypervisor:
    vms: dict[str, MemoryVm]
    restores: list[MemoryRestorer] = field(default_factory=list)
    sets: list[MemorySet] = field(default_factory=list)

    async def list_vms(self, engine: Any, *, api_gate: Any = None) -> list[dict[str, Any]]:
        return [
            {
                "id": vm.vm_id,
                "name": vm.name,
                "cluster": "memory",
                "status": "up",
                "tags": [],
                "host_id": None,
                "disks": [
                    {"id": d.disk_id, "alias": d.name, "size": d.size, "storage_domain_id": None}
                    for d in vm.disks
                ],
            }
            for vm in self.vms.values()
        ]

    async def vm_sources(
        self, engine: Any, names: Sequence[str], flow: str = "auto", **kwargs: Any
    ) -> MemorySet:
        found = MemorySet([MemorySource(self.vms[n]) for n in names])
        self.sets.append(found)
        return found

    @contextlib.asynccontextmanager
    async def _restore(self, name: str, ovf: str | None) -> AsyncIterator[MemoryRestorer]:
        restorer = MemoryRestorer(name, ovf)
        self.restores.append(restorer)
        yield restorer

    def vm_restore(
        self, engine: Any, manifest: Manifest, ovf: str | None, *, name: str | None = None,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        return self._restore(name or f"{manifest.vm_name}-restored", ovf)

    def standby_refresh(
        self, engine: Any, manifest: Manifest, ovf: str | None, standby: Any
    ) -> Any:
        raise NotImplementedError("this hypervisor keeps no standbys")


@contextlib.contextmanager
def installed(hypervisor: MemoryHypervisor) -> Iterator[list[dict[str, Any]]]:
    recovered: list[dict[str, Any]] = []

    async def recover(resources: Any, committed: bool) -> list[str]:
        recovered.append(dict(resources))
        return []

    checked: Hypervisor = hypervisor  # mypy: it fits the capability
    with registry.register(Plugin("memory", recover=recover, hypervisor=checked)):
        yield recovered


def make_config(tmp_path: Path) -> Path:
    (tmp_path / "engine-password").write_text("unused\n")
    return daemon_config(
        tmp_path,
        PASSPHRASE,
        "engines:\n  - name: mem\n    url: memory://\n    username: nobody\n"
        f"    password_file: {tmp_path / 'engine-password'}\n    plugin: memory\n",
    )


def memory_vm() -> MemoryVm:
    data = realistic_bytes(6 * CHUNK, seed=9) + bytes(2 * CHUNK)
    return MemoryVm("vm-9", "web9", [MemoryDisk("d9", "web9_os", bytearray(data))],
                    config=b"<ovf>web9</ovf>", config_format="ovf")  # fmt: skip


async def test_the_application_layer_backs_up_and_restores_a_registered_hypervisor(
    tmp_path: Path,
) -> None:
    config = load_all(make_config(tmp_path)).config
    vm = memory_vm()
    hypervisor = MemoryHypervisor({vm.name: vm})
    store = Store.open(tmp_path / "store", passphrase=PASSPHRASE.encode(), writable=True)
    with installed(hypervisor) as recovered:
        target, _ = await open_for_jobs("main", store)
        try:
            request = VmBackupRequest((vm.name,), level="full", engine="mem")
            backups = backup_vms(
                config, target, request, progress=lambda _: contextlib.nullcontext(None)
            )
            (outcome,) = [o async for o in backups]
            assert outcome.record.state is State.SUCCEEDED, outcome.record.error
            assert outcome.record.source == "memory"  # the journal names the plugin
            assert hypervisor.sets[-1].closed
            assert outcome.manifest is not None
            plan = plan_vm_restore(
                target, VmRestoreRequest(outcome.manifest.snapshot_id, engine="mem")
            )
            restored = await restore_vm(config, target, plan)
            assert restored.succeeded and restored.vm is not None
            assert restored.vm.name == "web9-restored"
            (restorer,) = hypervisor.restores
            assert restorer.ovf == "<ovf>web9</ovf>"  # the plugin got the OVF, not the store
            assert restorer.targets.published["d9"] == bytes(vm.disks[0].data)
        finally:
            await target.aclose()
    assert recovered == []  # nothing was killed


async def test_the_daemon_runs_a_registered_hypervisors_jobs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    vm = memory_vm()
    hypervisor = MemoryHypervisor({vm.name: vm})

    with installed(hypervisor):
        async with running(config) as service:
            listed = await service.list_vms("mem")
            assert [v["name"] for v in listed] == ["web9"]
            (view,) = service.start_backup(["web9"], level="full", engine="mem")
            assert view.task is not None
            await view.task
            assert view.state == "succeeded", view.error
            assert isinstance(view.outcome, BackupOutcome) and view.outcome.manifest
            snapshot = view.outcome.manifest.snapshot_id
            assert view.summary["snapshot"] == snapshot  # the API's shape, built once
            restore = service.start_restore(snapshot, engine="mem", name="web9-copy")
            assert restore.task is not None
            await restore.task
            assert restore.state == "succeeded", restore.error
            assert restore.summary["vm_name"] == "web9-copy"
            assert hypervisor.restores[-1].targets.published["d9"] == bytes(vm.disks[0].data)
