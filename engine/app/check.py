"""Restore verification, from a typed request to the record it leaves on the snapshot: the
one path for ``tessera snapshots check``, the daemon's ``check`` jobs (after a policy's
backup, ``POST /v1/snapshots/{id}/check``).

::

    CheckRequest → check_restore_point(store, request) → CheckRecord   (engine.restore.check)

What a record says in lines of text (``check_lines``) is written here once, for the terminal
and the daemon's job log; its document (``CheckRecord.doc``) is what the API shows and the
job history keeps. A check whose record could not be written raises ``RecordNotSaved``
with the record: callers report the verdict *and* that it was not saved (``not_saved_line``),
and end as failed (an unrecorded check is not a proved restore point on the listing).
"""

from dataclasses import dataclass

from engine.restore.check import check, check_expected
from engine.restore.record import CheckRecord, RecordNotSaved
from engine.store.chunk_store import Store
from engine.workers.pool import CpuPool


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """Check this snapshot (id or unique prefix): its ``disks`` (ids or names; empty: all),
    the ``expect``-ed paths of its tree (``/sda1/etc/hostname``)."""

    snapshot: str
    disks: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    launch_timeout: float | None = None  # None: the appliance's default

    def check(self) -> None:
        """ConfigError for an expected path that cannot be one (before a job starts)."""
        check_expected(self.expect)


async def check_restore_point(
    store: Store, request: CheckRequest, pool: CpuPool | None = None
) -> CheckRecord:
    """Check the snapshot and record the result on it (``engine.restore.check.check``;
    ``pool``: the caller's, else one of its own). Raises SnapshotNotFound, ConfigError
    (libguestfs missing), RecordNotSaved (the check ran; its ``record`` could not be
    written); an appliance that cannot run is an ``error`` record, not an exception."""
    request.check()
    return await check(
        store,
        request.snapshot,
        disks=request.disks,
        expect=request.expect,
        launch_timeout=request.launch_timeout,
        pool=pool,
    )


def check_lines(record: CheckRecord) -> list[str]:
    """A check's report: one line per filesystem (a failed one's checker output under it)
    and per expected path, then the verdict."""
    lines = []
    width = max((len(f.name) for f in record.filesystems), default=4)
    for f in record.filesystems:
        state = {"ok": "ok", "failed": "FAILED"}.get(f.state, f.state)
        what = f.problem or f.checker
        lines.append(f"{f.name:<{width}}  {f.fstype:<6}  {f.device:<16}  {state:<9}  {what}")
        lines += [f"    {line}".rstrip() for line in f.output.splitlines()]
    for p in record.paths:
        lines.append(
            f"{p.path}  " + (f"present ({p.kind})" if p.present else f"MISSING ({p.problem})")
        )
    lines.append(
        f"snapshot {record.snapshot} ({', '.join(record.disks)}) checked in "
        f"{record.duration:.0f} s: {record.summary()}"
    )
    return lines


def not_saved_line(error: RecordNotSaved) -> str:
    """The line that follows a check's report when its record could not be written."""
    return f"the check's verdict above was NOT recorded: {error}"
