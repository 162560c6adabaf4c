"""The embedded lab: a whole oVirt setup on one machine, so people can try Tessera.

A real oVirt installation needs an engine, hosts and shared storage. The lab replaces the engine
with a fake that speaks the engine's REST API closely enough for the real ``ovirtsdk4`` client,
and keeps the data path real:

- **fake engine** (``plugins.lab.engine``): an aiohttp application on 127.0.0.1 behind TLS
  with a throw-away CA (``tls``), the engine CA that also signs imageio's certificate. It
  serves SSO, the inventory of an in-memory model built from a ``Seed``, and the backup,
  snapshot, image transfer, disk attachment and restore routes that change it.
  Responses are written by the SDK's own XML writers, so what the client parses is what the
  real engine's schema allows.
- **real ovirt-imageio**, **qemu-nbd** and **generated qcow2/raw disks** (``imageio``,
  ``disks``): image transfers hand out real imageio tickets backed by qemu-nbd, checkpoints
  are real qcow2 bitmaps, so backups read real bytes and real dirty extents.
- **a DataMover** (``tessera-datamover``; ``engine.devices``, which needs root, ``/dev/fuse``
  and nbdfuse): a disk attached to it shows up as a file under the lab's own by-id directory
  (nbdfuse over qemu-nbd), so the LAN-free flows read and write real devices.

Like the real engine, the fake one moves its objects with time, whoever polls: backups,
transfers, snapshots, checkpoint deletes and new disks step on one clock the engine is given
(``engine.clock``), the real one unless a test passes a ``FakeClock`` it advances itself.
imageio, a real program, counts tickets' idle time and expiry in real seconds.

``lab`` runs all of it in the background for ``tessera lab up`` (the process itself is
``python -m plugins.lab run``, ``__main__``); ``engine`` documents what the fake engine
serves. ``PLUGIN`` provides no capability, only the commands ``up``, ``show`` and ``down``;
lab jobs run through the oVirt plugin, which recovers what they leave.

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
