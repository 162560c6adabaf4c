"""Backup policies (``policies.d/*.yaml``, one policy per file) as frozen msgspec structs.

A policy says which VMs (``selection``), when (``schedule``: calendar expressions), at which
level (``level``), through which read path (``flow``), how long to keep restore points
(``retention``, applied by ``engine.maint.retention``), where to replicate, which peer keeps a
cold standby, whether each new restore point is checked (``restore_check``), and who hears
about it. Short forms the loader accepts: ``schedule: daily 02:00``
for a one-element list, ``level: differential`` for ``level: {default: differential}``,
``notifications.on: failure`` for a one-element list.
"""

from collections.abc import Collection
from datetime import datetime, tzinfo
from fnmatch import fnmatchcase
from typing import Literal

import msgspec

from engine.config.types import Duration, NonNegativeInt, Schedule
from engine.sched.calendar import Calendar
from engine.sched.level import WEEKDAY_NAMES, Level, LevelDecision, choose_level
from engine.sources.selection import selects_disk

Flow = Literal["auto", "backup-api", "snapshot-imageio", "snapshot-attach"]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
# Most important first; engine.obs.summary.Event (the digest's and the mail's) is the same.
Event = Literal["integrity", "failure", "warning", "success"]


class Selection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """VMs chosen by cluster, name/glob or tag (any of them selects), minus ``exclude``
    (names/globs); ``disks`` limits the disks backed up (names/globs of disk aliases, or disk
    ids; empty: all): the others are skipped with the reason ``not selected``, and a VM none
    of whose disks they take fails its backup before anything is created."""

    engine: str | None = None  # engine name in the daemon config; None: the only one
    clusters: tuple[str, ...] = ()
    vms: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    disks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.clusters or self.vms or self.tags):
            raise ValueError("the selection needs clusters, vms or tags")

    def selects_vm(self, name: str, cluster: str | None = None, tags: Collection[str] = ()) -> bool:
        if any(fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        return (
            any(fnmatchcase(name, pattern) for pattern in self.vms)
            or (cluster is not None and any(fnmatchcase(cluster, c) for c in self.clusters))
            or any(tag in tags for tag in self.tags)
        )

    def selects_disk(self, name: str, disk_id: str | None = None) -> bool:
        return selects_disk(self.disks, name, disk_id)


class LevelRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``default`` for ordinary runs; a full one every ``full_every`` and/or on the
    ``full_on`` weekdays (see ``engine.sched.level`` for the order of the rules)."""

    default: Level = "incremental"
    full_every: Duration | None = None
    full_on: tuple[Weekday, ...] = ()

    def decide(
        self, last_full: datetime | None, now: datetime, tz: tzinfo | None = None
    ) -> LevelDecision:
        return choose_level(
            default=self.default,
            last_full=last_full,
            now=now,
            full_every=self.full_every.delta if self.full_every is not None else None,
            full_on={WEEKDAY_NAMES.index(day) for day in self.full_on},
            tz=tz,
        )


class Retention(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What to keep; None means the rule is off. ``keep_within`` is a duration string
    (``Duration`` is a ``str`` with ``.delta``). Snapshots made by hand (``tessera backup``,
    the API without a policy) are left alone — kept and not counted by the rules — unless
    ``include_manual`` is true."""

    keep_last: NonNegativeInt | None = None
    keep_hourly: NonNegativeInt | None = None
    keep_daily: NonNegativeInt | None = None
    keep_weekly: NonNegativeInt | None = None
    keep_monthly: NonNegativeInt | None = None
    keep_yearly: NonNegativeInt | None = None
    keep_within: Duration | None = None
    include_manual: bool = False


class ReplicationTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    peer: str  # a peer name in the daemon config
    mode: Literal["push", "pull"] = "push"


class Standby(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A cold-standby copy kept up to date at a peer after each replicated snapshot."""

    peer: str
    cluster: str
    storage_domain: str | None = None  # None: the cluster's default
    name_suffix: str = "-standby"


class RestoreCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Restore verification (``engine.restore.check``): with ``after_backup``, each restore
    point a backup of the policy makes is checked right after it — its filesystems checked
    read-only in an appliance VM (each one's fsck in no-write mode) and the ``expect``-ed
    paths of its tree (``/sda1/etc/hostname``) looked up — as a ``check`` job; the verdict is
    recorded on the snapshot. ``disks`` (names or ids; empty: all) limits the disks served."""

    after_backup: bool = True
    expect: tuple[str, ...] = ()
    disks: tuple[str, ...] = ()
    launch_timeout: Duration | None = None  # the appliance's boot; None: 300 s

    def __post_init__(self) -> None:
        bad = [p for p in self.expect if not p.startswith("/") or p.count("/") < 2]
        if bad:
            raise ValueError(f"expect: {bad[0]!r} is not a path of the tree (/sda1/etc/hostname)")


class Notifications(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Who hears of a run: after each run, one digest mail to ``to`` and one call to each
    of ``webhooks`` (names of the daemon config's ``webhooks``), when the run raised an
    event in ``on``: ``integrity`` (stored data found wrong), ``failure`` (a VM failed),
    ``warning`` (a VM succeeded with warnings), ``success``."""

    on: tuple[Event, ...] = ("failure", "integrity")
    to: tuple[str, ...] = ()  # e-mail addresses; empty: no e-mail
    webhooks: tuple[str, ...] = ()  # webhook names in the daemon config

    def __post_init__(self) -> None:
        bad = [address for address in self.to if "@" not in address]
        if bad:
            raise ValueError(f"not an e-mail address: {bad[0]!r}")


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    selection: Selection
    schedule: tuple[Schedule, ...] = ()  # empty: runs only when started by hand
    enabled: bool = True
    store: str | None = None  # store name in the daemon config; None: the only one
    level: LevelRules = LevelRules()
    flow: Flow = "auto"
    require_quiesce: bool = False  # fail instead of taking a crash-consistent snapshot
    retention: Retention = Retention()
    replication: tuple[ReplicationTarget, ...] = ()
    standby: Standby | None = None
    restore_check: RestoreCheck | None = None
    notifications: Notifications = Notifications()

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"policy name {self.name!r}: non-empty, without '/'")

    @property
    def calendars(self) -> tuple[Calendar, ...]:
        """The parsed schedule (what ``engine.sched.scheduler.Scheduler`` reads)."""
        return tuple(s.calendar for s in self.schedule) if self.enabled else ()
