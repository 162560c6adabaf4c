"""Errors carry identity and a class.

Every error Tessera raises on purpose is an ``EngineError``: it has named fields (``pack``,
``chunk``, ``snapshot``, ``path``…) kept in ``fields`` and a message template that uses them,
so the message always names the object. Classes say what a caller may do:

- ``ConfigError``      bad input from a person (arguments, files, passphrases); fix and retry.
- ``TransientError``   may succeed when retried (timeouts, resets); ``retryable`` is True.
- ``IntegrityError``   stored data is wrong (CRC, AEAD tag, id mismatch, tampering); never
                       retried, always reported.
- ``StoreError``       the store cannot do what was asked (missing chunk, locked, bad layout).
- ``WorkerError``      a CPU worker died or misbehaved; the job fails, the pool lives on.

Exit codes live in the CLI entry only; HTTP statuses only at the API edge.
"""

from typing import ClassVar


class EngineError(Exception):
    """Base of Tessera's errors. Subclasses set ``template``; fields fill it in."""

    template: ClassVar[str] = "{message}"
    retryable: ClassVar[bool] = False

    def __init__(self, **fields: object) -> None:
        self.fields = fields
        super().__init__(self.template.format(**fields))

    @property
    def message(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (CPU worker processes); rebuild from fields.
        return (_rebuild, (type(self), self.fields))


def _rebuild(cls: type[EngineError], fields: dict[str, object]) -> EngineError:
    return cls(**fields)


class ConfigError(EngineError):
    template = "{message}"


class KeyFileError(ConfigError):
    """The key file cannot be read or unlocked."""

    template = "key file {path}: {reason}"


class TransientError(EngineError):
    retryable = True


class StoreError(EngineError):
    template = "store {path}: {reason}"


class StoreWriteError(StoreError):
    """Writing to the store failed (a full disk, an I/O error). ``what`` names the file or
    pack, ``reason`` the errno and, for a full disk, the space needed and free. The write was
    abandoned; committed snapshots are untouched (``engine.store`` docstring)."""

    template = "store {path}: cannot write {what}: {reason}"


class StoreLocked(StoreError):
    template = "store {path}: {reason}"


class ChunkMissing(StoreError):
    template = "chunk {chunk} is not in the store{context}"


class SnapshotNotFound(StoreError):
    template = "snapshot {snapshot}: {reason}"


class ObjectStoreError(StoreError):
    """An S3 request failed for good (after the client's own retries). Names the endpoint,
    bucket and key, the operation and the S3 error code (``code``; a connection failure has
    ``code`` "connection")."""

    template = "S3 {endpoint} bucket {bucket} key {key}: {op} failed: {code}: {reason}"


class ObjectStoreUnreachable(ObjectStoreError):
    """The endpoint did not answer (connection refused, reset, timed out) after the client's
    retries: may work later."""

    retryable = True


class BudgetSpent(StoreError):
    """A store's monthly request budget for its bucket is spent (``engine.store.budget``)."""

    template = "store {path}: {reason}"


class ObjectStoreUnfit(StoreError):
    """A bucket lacks what packs need (found by probing at open): names the endpoint, the
    bucket and the capability."""

    template = "S3 {endpoint} bucket {bucket} cannot hold packs: {capability}: {reason}"


class PackExists(StoreError):
    """A create-only put found another pack under that name: never overwritten."""

    template = "pack {pack} already exists at {where} with other content; not overwritten"


class PackMissing(StoreError):
    template = "pack {pack} is not at {where}"


class IntegrityError(EngineError):
    template = "{message}"


class CorruptRecord(IntegrityError):
    template = "corrupt record for chunk {chunk} in pack {pack} at offset {offset}: {reason}"


class CorruptPack(IntegrityError):
    template = "corrupt pack {pack}: {reason}"


class CorruptDiskMap(IntegrityError):
    template = "corrupt DiskMap {path}: {reason}"


class ManifestTampered(IntegrityError):
    template = "manifest of snapshot {snapshot} ({path}) failed authentication: {reason}"


class WorkerError(EngineError):
    template = "CPU worker failed while {task}: {reason}"


class SourceError(EngineError):
    """Reading a disk failed for good (after retries); names the disk and offset."""

    template = "disk {disk} at offset {offset}: {reason}"
