"""Issue 16: a backup made by hand is not pruned by a policy's retention unless the policy
says ``retention.include_manual: true``. Through the real daemon (``Service``, an in-memory
hypervisor registered as a plugin, a real store): a policy run, a backup started by hand
(as ``tessera backup vm`` sends it, no policy), another policy run whose retention keeps
one snapshot."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from tests.daemon_setup import CHUNK, daemon_config, running
from tests.helpers import capture_all_logs, realistic_bytes
from tests.integration.test_new_hypervisor import MemoryHypervisor, installed
from tests.memory import MemoryDisk, MemoryVm

pytestmark = pytest.mark.integration

PASSPHRASE = "manual-retention"


def make_config(tmp_path: Path, include_manual: str | None) -> Path:
    (tmp_path / "engine-password").write_text("unused\n")
    config = daemon_config(
        tmp_path,
        PASSPHRASE,
        "engines:\n  - name: mem\n    url: memory://\n    username: nobody\n"
        f"    password_file: {tmp_path / 'engine-password'}\n    plugin: memory\n",
    )
    policies = tmp_path / "policies.d"
    policies.mkdir()
    extra = f"  include_manual: {include_manual}\n" if include_manual is not None else ""
    (policies / "nightly.yaml").write_text(
        "name: nightly\nselection:\n  vms: [web1]\nretention:\n  keep_last: 1\n" + extra
    )
    return config


@pytest.mark.parametrize("include_manual", [None, "false", "true"])
async def test_a_policy_retention_leaves_a_manual_backup_unless_told(
    tmp_path: Path, include_manual: str | None
) -> None:
    disk = MemoryDisk("d1", "web1_os", bytearray(realistic_bytes(4 * CHUNK, seed=1)))
    vms = {"web1": MemoryVm("vm-1", "web1", [disk])}
    config = make_config(tmp_path, include_manual)
    with installed(MemoryHypervisor(vms)):
        async with running(config) as service:
            (policy,) = service.policies
            await service.run_policy(policy, datetime.now(UTC))
            (manual,) = service.start_backup(["web1"])  # POST /v1/backups, no policy
            assert manual.task is not None
            await manual.task
            with capture_all_logs() as logs:
                await service.run_policy(policy, datetime.now(UTC))
            views = sorted(service.jobs.jobs(), key=lambda v: v.created)
    assert [(v.policy, v.state) for v in views] == [
        ("nightly", "succeeded"),
        (None, "succeeded"),
        ("nightly", "succeeded"),
    ]
    first, by_hand, second = (v.outcome.manifest.snapshot_id for v in views)  # type: ignore[union-attr]

    store = Store.open(tmp_path / "store", passphrase=PASSPHRASE.encode(), writable=False)
    try:
        left = {e.snapshot_id for e in store.snapshots()}
        tags = {sid: store.manifest(sid).tags for sid in left}
    finally:
        store.close()
    assert tags[second]["origin"] == "policy" and tags[second]["policy"] == "nightly"
    (applied,) = [e for e in logs if e["event"] == "retention.applied"]
    assert first in applied["removed"]
    if include_manual == "true":
        assert left == {second}
        assert by_hand in applied["removed"] and applied["kept_manual"] == []
    else:
        assert left == {by_hand, second}
        assert tags[by_hand]["origin"] == "manual" and "policy" not in tags[by_hand]
        assert applied["kept_manual"] == [by_hand] and by_hand not in applied["removed"]
