"""The embedded lab: a whole oVirt setup on one machine, so people can try Tessera.

A real oVirt installation needs an engine, hosts and shared storage. The lab replaces the engine
with a fake that speaks the engine's REST API closely enough for the real ``ovirtsdk4`` client,
and keeps the data path real:

- **fake engine** (``plugins.lab.engine``): an aiohttp application on 127.0.0.1 behind TLS
  with a throw-away CA (``tls``), the engine CA that also signs imageio's certificate. It
  serves SSO, the API root and the inventory from an in-memory model built from a ``Seed``.
  Responses are written by the SDK's own XML writers, so what the client parses is what the
  real engine's schema allows.
- **real ovirt-imageio**, **qemu-nbd** and **generated qcow2/raw disks** (later slices): image
  transfers hand out real imageio tickets backed by qemu-nbd, checkpoints are real qcow2
  bitmaps, so backups read real bytes and real dirty extents.

Slice 1 (this one): SSO login/logout, Bearer-token checks, ``GET /ovirt-engine/api`` and
read-only inventory (data centers, clusters, hosts, storage domains, VMs, disk attachments,
disks, tags) with a subset of the engine's search language.

Next: disks backed by real image files, snapshots, incremental backups with checkpoints, image
transfers through imageio, events and jobs, then restore (POST disks/vms/diskattachments).

The lab listens on loopback only and must never be exposed: its credentials are the seed's
and anyone who can reach it can read the whole (fake) inventory.
"""

from collections.abc import Mapping
from typing import Any

from engine.sources.registry import Plugin


async def _recover(resources: Mapping[str, Any], committed: bool) -> list[str]:
    return []  # lab jobs run through the oVirt plugin, which recovers their resources


def _lab_command(name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        from plugins.lab import lab  # noqa: PLC0415 - keep the entry point light

        return getattr(lab, name)(*args, **kwargs)

    return call


PLUGIN = Plugin(
    name="lab",
    recover=_recover,
    commands={name: _lab_command(name) for name in ("up", "show", "down")},
)
