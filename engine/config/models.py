"""The daemon configuration as frozen msgspec structs (unknown keys rejected)."""

from pathlib import Path
from typing import Protocol, TypeVar

import msgspec

from engine.core.errors import ConfigError
from engine.store.chunk_store import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE
from engine.store.keys import ENCRYPTION_AES


class StoreSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    path: Path
    chunk_size: int | str = DEFAULT_CHUNK_SIZE  # used by `store init`; "1MiB" accepted
    pack_size: int | str = DEFAULT_PACK_SIZE
    encryption: str = ENCRYPTION_AES
    key_file: Path | None = None
    passphrase_file: Path | None = None


class EngineSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    url: str
    username: str
    password_file: Path
    ca_file: Path | None = None


class DataMoverSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The VM Tessera runs in, for the LAN-free flow (disks attached to it): found by
    ``vm_name`` or ``host_uuid`` (default: this machine's SMBIOS UUID). Attached disks are
    found under ``by_id_dir`` by their serial (the disk id); one that has not appeared there
    ``device_timeout`` seconds after the attachment fails the disk."""

    vm_name: str | None = None
    host_uuid: str | None = None
    by_id_dir: Path = Path("/dev/disk/by-id")
    device_timeout: float = 60.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    stores: tuple[StoreSection, ...] = ()
    engines: tuple[EngineSection, ...] = ()
    datamover: DataMoverSection = DataMoverSection()

    def store(self, name: str | None = None) -> StoreSection:
        return _pick(self.stores, name, "store")

    def engine(self, name: str | None = None) -> EngineSection:
        return _pick(self.engines, name, "engine")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def _pick(items: tuple[N, ...], name: str | None, what: str) -> N:
    if name is None:
        if len(items) == 1:
            return items[0]
        raise ConfigError(message=f"the configuration has {len(items)} {what}s: name one")
    for item in items:
        if item.name == name:
            return item
    raise ConfigError(message=f"no {what} named {name!r} in the configuration")
