"""Request bodies of the daemon API: frozen structs, unknown keys refused (400)."""

import msgspec


class BackupRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    vms: tuple[str, ...]  # names or globs
    level: str = "incremental"
    flow: str = "auto"
    require_quiesce: bool = False
    engine: str | None = None
    store: str | None = None
    policy: str | None = None  # take level rules, flow, quiesce and store from this policy
    # names/globs of disk aliases, or disk ids; None: the policy's selection.disks, else all
    disks: tuple[str, ...] | None = None


class RestoreRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    snapshot: str
    name: str | None = None
    cluster: str | None = None
    storage_domain: str | None = None
    flow: str = "imageio"
    engine: str | None = None
    store: str | None = None
    disk: str | None = None  # one disk (id or name) of the snapshot; None: all
    into_vm: str | None = None  # attach to this existing VM instead of creating one


class ProtectRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    protected: bool = True


class GcRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/maintenance/gc`` (the body may be empty): what ``tessera gc`` was given;
    an option left out takes the daemon's configuration (``maintenance``)."""

    dry_run: bool = False
    repack_threshold: float | None = None  # 0..1
    grace_seconds: float | None = None  # ≥ 0
    rate_limit: int | None = None  # bytes per second of repack I/O, ≥ 1


class StandbyRefreshRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/standby``: ``tessera standby refresh`` through the daemon."""

    vm: str  # the backed-up VM, name or id, in the store
    cluster: str
    storage_domain: str | None = None
    suffix: str = "-standby"
    snapshot: str | None = None  # id or prefix; None: the VM's newest
    engine: str | None = None
    store: str | None = None


class CheckRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/snapshots/{id}/check`` (the body may be empty): restore verification of one
    snapshot, as ``tessera snapshots check`` (``engine.app.check``)."""

    expect: tuple[str, ...] | None = None  # paths of the tree that must exist: /sda1/etc/x
    disks: tuple[str, ...] | None = None  # disk names or ids; None: all
    launch_timeout: float | None = None  # seconds for the appliance's boot; None: 300


class ExportRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/exports``: one disk of a snapshot served over NBD by the daemon."""

    snapshot: str  # id or unique prefix
    disk: str | None = None  # id or name; None: the snapshot's only disk
    store: str | None = None
    writable_overlay: bool = False  # writes go to an overlay the daemon removes at the end
    ttl_seconds: float | None = None  # > 0; None: until cancelled


class FilesRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/snapshots/{id}/files``: a browsing session on the snapshot's filesystems."""

    store: str | None = None
    disks: tuple[str, ...] | None = None  # ids or names; None: every disk
