"""A VM's checkpoint chain on the engine, as the backup-API flow uses it (API-NOTES § 4.7).

The engine keeps one chain per VM (``GET vms/{vm}/checkpoints``, root first). Each backup adds
a checkpoint; Tessera records the new one in its snapshot's manifest and starts the next
incremental from it. Two things follow:

- ``problem``: before an incremental, is the parent checkpoint still usable? An administrator
  may have deleted it, or the engine dropped the chain (a failed redefine, § 4.8); starting
  from it would be refused (400). The caller then backs up every disk in full and records
  the reason returned here.
- ``drop_stale``: after a successful backup, a later backup can only start from the new
  checkpoint (an incremental) or from the last full's (a differential: the job passes it as
  ``keep_checkpoints``). Every other checkpoint older than the new one is of no use to
  Tessera and costs the engine a bitmap per disk: they are deleted oldest first (the safe
  order, § 4.7; the engine re-links a deleted checkpoint's child), each polled until gone (a
  cold delete finishes later). Only checkpoints Tessera made are touched (their description,
  copied from our backup, starts with ``DESCRIPTION_PREFIX``): other backup products may rely
  on theirs.

Raised: the ``EngineError`` subclasses of ``client``; ``drop_stale`` raises
``CheckpointError`` naming the checkpoint that would not go.
"""

import asyncio
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, Final

import ovirtsdk4 as sdk
import ovirtsdk4.types as t
import structlog

from engine.core.errors import EngineError
from plugins.ovirt.client import EngineClient

log = structlog.get_logger("tessera.ovirt")

DESCRIPTION_PREFIX: Final = "Tessera "  # the start of every backup description we send
DELETE_TIMEOUT: Final = 60.0  # per checkpoint, as SDK-EX checkpoints.py waits
POLL_INTERVAL: Final = 0.25  # seconds between polls of a deleted checkpoint


class CheckpointError(EngineError):
    template = "VM {vm}: checkpoint {checkpoint}: {reason}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    id: str
    parent_id: str | None
    state: str  # "created" | "invalid"
    description: str

    @property
    def ours(self) -> bool:
        return self.description.startswith(DESCRIPTION_PREFIX)


def _service(conn: sdk.Connection, vm_id: str) -> Any:
    return conn.system_service().vms_service().vm_service(vm_id).checkpoints_service()


async def chain(client: EngineClient, vm_id: str) -> list[Checkpoint]:
    """The VM's checkpoints, root first."""

    def read(conn: sdk.Connection) -> list[Checkpoint]:
        return [
            Checkpoint(
                str(c.id),
                c.parent_id,
                str(c.state.value) if c.state else "created",
                c.description or "",
            )
            for c in _service(conn, vm_id).list()
        ]

    return await client.call(read, "list checkpoints", obj=f"VM {vm_id}")


async def problem(client: EngineClient, vm_id: str, checkpoint: str) -> str | None:
    """None if ``checkpoint`` can start an incremental backup of the VM, else why not."""
    found = {c.id: c for c in await chain(client, vm_id)}
    c = found.get(checkpoint)
    if c is None:
        return f"checkpoint {checkpoint} no longer exists on the engine (deleted?): full read"
    if c.state != t.CheckpointState.CREATED.value:
        return f"checkpoint {checkpoint} is {c.state} on the engine: full read"
    return None


async def delete(client: EngineClient, vm_id: str, vm_name: str, checkpoint: str) -> None:
    """Delete one checkpoint and poll until the engine no longer has it."""

    def remove(conn: sdk.Connection) -> bool:
        try:
            _service(conn, vm_id).checkpoint_service(checkpoint).remove()
        except sdk.NotFoundError:
            return False
        return True

    def exists(conn: sdk.Connection) -> bool:
        try:
            _service(conn, vm_id).checkpoint_service(checkpoint).get()
        except sdk.NotFoundError:
            return False
        return True

    what = f"checkpoint {checkpoint} of VM {vm_name}"
    if not await client.call(remove, "delete checkpoint", obj=what):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DELETE_TIMEOUT
    while await client.call(exists, "poll checkpoint", obj=what):
        if loop.time() > deadline:
            raise CheckpointError(
                vm=vm_name,
                checkpoint=checkpoint,
                reason=f"still there {DELETE_TIMEOUT:.0f} s after it was deleted",
            )
        await asyncio.sleep(POLL_INTERVAL)


async def drop_stale(
    client: EngineClient, vm_id: str, vm_name: str, newest: str, keep: Set[str]
) -> list[str]:
    """Delete (oldest first) Tessera's checkpoints older than ``newest`` (the one the backup
    just made) that are not in ``keep``; returns their ids. Nothing is deleted when the chain
    does not hold ``newest`` (then nothing says which checkpoints are old)."""
    checkpoints = await chain(client, vm_id)
    last = next((i for i, c in enumerate(checkpoints) if c.id == newest), None)
    if last is None:
        return []
    removed = []
    for c in checkpoints[:last]:
        if c.id in keep:
            continue
        if not c.ours:
            log.info("keeping another product's checkpoint", vm=vm_name, checkpoint=c.id)
            continue
        await delete(client, vm_id, vm_name, c.id)
        log.info("deleted stale checkpoint", vm=vm_name, checkpoint=c.id)
        removed.append(c.id)
    return removed
