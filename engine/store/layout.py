"""Where things live inside a store directory, and its ``config.json``.

::

    STORE/
      config.json            StoreConfig (format, store id, chunk size, encryption, pack size,
                             zstd level when not the default)
      keys/key               the key file (unless kept elsewhere with --key-file)
      lock                   the writer lock (flock)
      index.db               chunk index (SQLite WAL), rebuildable from packs
      catalog.db             snapshot catalog (SQLite WAL), rebuildable from manifests
      packs/tmp/*.pack.tmp   the open pack (discarded by recovery)
      packs/nn/<name>.pack   sealed packs (a store whose packs live in a bucket: the cache
                             of packs written and read lately, ``engine.store.remote``)
      keys/s3.json           such a store's S3 access key and secret (0600)
      snapshots/<id>/        DiskMaps (disk-<n>.dmap) and the manifest (commit point)
      trash/<t>-<name>.pack  packs GC retired at unix time t, deleted after the grace period
      trash/<t>-<name>.remote  the same for a pack in a bucket (its size; the object is
                             deleted after the grace period)
      gc/                    GC's lock and work database (temporary; rebuilt by each run)
      quarantine/<name>.pack packs repair took out of use, each beside <name>.json (why; the
                             pack that replaced it, when its intact records were re-sealed)
      *.db.damaged-<time>    an index or catalog that was not a database, moved aside
      journal/               unfinished jobs (``engine.jobs.journal``), for recovery
      history.db             finished daemon jobs (``engine.jobs.history``): not store data
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from engine.core.errors import StoreError
from engine.store.retention import LockPolicy

STORE_FORMAT: Final = 1
CONFIG_NAME: Final = "config.json"
MANIFEST_NAME: Final = "manifest"
# GC's trash entry for a pack in a bucket: ``<t>-<name>.remote`` holding its size and, with
# object lock, the date it is locked until (``engine.store.retention``): "<size> [<until>]".
REMOTE_TRASH: Final = ".remote"
# In a store in a bucket: the store's (and a snapshot's) objects are in the bucket too
# (``engine.store.remote``); a snapshot's marker holds its object lock date, if any.
IN_BUCKET: Final = ".in-bucket"


def snapshot_lock(snapshot_dir: Path) -> int | None:
    """The date a snapshot's objects in the bucket are locked until (its ``IN_BUCKET``
    marker), or None: not locked, not in the bucket yet, or a marker from before."""
    try:
        text = (snapshot_dir / IN_BUCKET).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def remote_trash(size: int, until: int | None) -> bytes:
    """The content of a ``.remote`` trash marker."""
    return b"%d\n" % size if until is None else b"%d %d\n" % (size, until)


def read_remote_trash(path: Path) -> tuple[int, int | None]:
    """(size, lock date or None) of a ``.remote`` trash marker; (0, None) if unreadable."""
    try:
        fields = path.read_bytes().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (OSError, ValueError, IndexError):
        return 0, None


# What a new store's ``StoreConfig`` holds unless told otherwise, and what it may hold. Here,
# beside it, rather than in ``chunk_store``: the command line offers these choices before it
# opens anything, and must not load the store to do so (issue 15).
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024  # see the package docstring for the measurement
DEFAULT_PACK_SIZE: Final = 64 * 1024 * 1024
MIN_PACK_SIZE: Final = 1024 * 1024
ENCRYPTION_AES: Final = "aes-256-gcm"
ENCRYPTION_NONE: Final = "none"
ENCRYPTIONS: Final = (ENCRYPTION_AES, ENCRYPTION_NONE)
# zstd level 3 is zstd's own default: on filesystem images it stores ~7 % less than level 1
# for ~40 % more CPU. `make bench` prints both so the choice can be revisited.
DEFAULT_ZSTD_LEVEL: Final = 3
# What a store may choose (``StoreConfig.zstd_level``): zstd's fast levels (negative) up to
# 19; 20-22 need a large window's memory in every worker for ~1 % less.
MIN_ZSTD_LEVEL: Final = -7
MAX_ZSTD_LEVEL: Final = 19


# A store whose packs live in a bucket keeps this much of them in ``packs/`` (its cache),
# unless ``RemoteConfig.cache_bytes`` says otherwise; never less than two packs.
DEFAULT_CACHE_BYTES: Final = 4 * 1024 * 1024 * 1024


@dataclass(frozen=True)
class RemoteConfig:
    """Where a store's sealed packs live when not in ``packs/``: an S3 bucket (the key is
    in ``keys/s3.json``, never here)."""

    endpoint: str  # http(s)://host:port
    bucket: str
    prefix: str = ""  # ends with "/" when set: several stores may share a bucket
    region: str = "us-east-1"
    cache_bytes: int = DEFAULT_CACHE_BYTES
    # Request budgets (``engine.store.budget``); 0: no limit.
    requests_per_second: float = 0
    requests_per_month: int = 0
    # Object lock (``engine.store.retention``): "" (none), "GOVERNANCE" or "COMPLIANCE", and
    # how long every object written is kept at least.
    object_lock: str = ""
    lock_seconds: int = 0

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def lock(self) -> LockPolicy | None:
        return LockPolicy(self.object_lock, self.lock_seconds) if self.object_lock else None


@dataclass(frozen=True)
class StoreConfig:
    format: int
    store_id: str
    chunk_size: int
    encryption: str
    pack_size: int
    created: str
    # The level writers compress new records with (readers need no setting: every zstd
    # frame decodes alike). Written to config.json only when it is not the default, so a
    # store made with defaults stays readable by releases that predate the setting.
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    # Packs in a bucket (``engine.store.remote``); None: in ``packs/``. Written only when
    # set, like ``zstd_level``.
    remote: RemoteConfig | None = None

    def dump(self) -> bytes:
        doc = asdict(self)
        if self.zstd_level == DEFAULT_ZSTD_LEVEL:
            del doc["zstd_level"]
        if self.remote is None:
            del doc["remote"]
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def load(cls, root: Path) -> "StoreConfig":
        path = root / CONFIG_NAME
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("remote") is not None:
                doc["remote"] = RemoteConfig(**doc["remote"])
            config = cls(**doc)
        except FileNotFoundError:
            raise StoreError(path=root, reason="not a Tessera store (no config.json)") from None
        except (OSError, ValueError, TypeError) as e:
            raise StoreError(path=root, reason=f"config.json is unreadable: {e}") from e
        if config.format != STORE_FORMAT:
            raise StoreError(path=root, reason=f"unsupported store format {config.format}")
        check_zstd_level(config.zstd_level, root)
        return config


def check_zstd_level(level: object, path: Path) -> None:
    """StoreError unless ``level`` is a zstd level a store may use."""
    if type(level) is not int or not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
        raise StoreError(
            path=path,
            reason=f"zstd level {level!r} is not in {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}",
        )


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def default_key_file(self) -> Path:
        return self.root / "keys" / "key"

    @property
    def index(self) -> Path:
        return self.root / "index.db"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    @property
    def gc(self) -> Path:
        return self.root / "gc"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def trash_files(self) -> dict[str, Path]:
        """Packs in the trash by pack name (``<unix time>-<name>.pack``, or ``.remote`` for
        a pack in a bucket)."""
        if not self.trash.exists():
            return {}
        found = [*self.trash.glob("*-*.pack"), *self.trash.glob(f"*-*{REMOTE_TRASH}")]
        return {p.stem.partition("-")[2]: p for p in found}

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def manifest(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id / MANIFEST_NAME

    def committed_snapshots(self) -> set[str]:
        if not self.snapshots.exists():
            return set()
        return {p.parent.name for p in self.snapshots.glob(f"*/{MANIFEST_NAME}")}

    @property
    def s3_credentials(self) -> Path:
        return self.root / "keys" / "s3.json"

    def pack_files(self) -> dict[str, Path]:
        """Sealed pack files on disk by name (in a store whose packs live in a bucket: the
        cached ones)."""
        return {p.stem: p for p in self.packs.glob("??/*.pack")}
