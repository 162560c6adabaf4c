"""Local qcow2/raw images as backup sources and restore targets.

``source.LocalImageSource`` reads an image: a raw one directly (``engine.io.direct``, no
process), a qcow2 one through a read-only ``qemu-nbd`` (full, or incremental from a
persistent bitmap used as the checkpoint); ``target.LocalImageTarget`` writes a restore
into a new sparse image (or an existing one) through a writable ``qemu-nbd``
(``engine.restore.nbd_target``). ``LocalImages`` is the plugin's ``ImageIO`` capability;
``source.recover`` undoes what a killed job left (qemu-nbd exports, partial images,
bitmaps). ``PLUGIN`` is this plugin's registry entry
(entry point ``tessera.plugins: local``).
"""

import os
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.sources.capabilities import ImageIO
from engine.sources.registry import Plugin


async def _recover(resources: Mapping[str, Any], committed: bool) -> list[str]:
    from plugins.local.source import recover  # noqa: PLC0415 - keep the entry point light

    return await recover(dict(resources), committed)


# What each job's recorder was given per key, so that the targets of several disks of one
# restore add to a journal list instead of replacing it (a recorder stores a key's value).
# Keyed by the recorder: it lives as long as its job.
_recorded: "weakref.WeakKeyDictionary[Any, dict[str, list[Any]]]" = weakref.WeakKeyDictionary()


async def _append(record: Any, key: str, value: Any) -> None:
    values = _recorded.setdefault(record, {}).setdefault(key, [])
    if value not in values:
        values.append(value)
    await record(key, list(values))


class LocalImages:
    """The plugin's ``engine.sources.capabilities.ImageIO``."""

    def image_source(self, paths: Sequence[Path], vm_name: str | None = None) -> Any:
        """The images ``paths`` as the disks of one VM (``vm_name``, else the first
        image's name)."""
        from plugins.local.source import LocalImageSource  # noqa: PLC0415

        return LocalImageSource(paths, vm_name)

    def image_target(self, path: Path, entry: Any, record: Any, fmt: str | None = None) -> Any:
        """A restore target for one disk of a snapshot (``entry``: its manifest DiskEntry).

        Journals (before each exists) the partial image and qemu-nbd's private directory,
        by absolute path: recovery may run in another working directory."""
        from plugins.local.target import LocalImageTarget  # noqa: PLC0415

        return LocalImageTarget(
            Path(os.path.abspath(path)),
            entry.size,
            fmt=fmt,
            name=entry.name,
            disk_id=entry.disk_id,
            journal_partial=lambda partial: _append(record, "partial_images", str(partial)),
            journal_export=lambda workdir: _append(record, "exports", {"dir": str(workdir)}),
        )


PLUGIN = Plugin(name="local", recover=_recover, images=LocalImages())


if TYPE_CHECKING:  # mypy proves the plugin fits the engine's capability

    def _fits(i: LocalImages) -> ImageIO:
        return i
