"""Restore verification in the daemon: ``check`` jobs.

A check of one snapshot (``engine.app.check``: its filesystems checked read-only in an
appliance VM, expected paths looked up, the verdict recorded on the snapshot) runs as a job
of the ``JobManager`` (kind ``check``, its "VM" ``snapshot:<id>``: two checks of one snapshot
never overlap, and a check never holds up its VM's next backup), so it shows in ``tessera
jobs`` with its report lines and its record as the summary. It is started:

- by a policy whose ``restore_check.after_backup`` is on, after each backup that made a
  snapshot (``Service._run_policy``; the job is the run's, told of in its digest);
- by ``POST /v1/snapshots/{id}/check`` (``engine.api.server``);
- on the schedule ``maintenance.restore_check`` (``engine.daemon.maintenance``): the newest
  restore point of every VM in every store (``start_newest``), each with the expected paths
  of the policy that made it (its manifest's ``policy`` tag), if that policy names any.

A check that fails or cannot run ends the job ``failed``; the record says why. A check
whose record cannot be written (a full or failing store filesystem) ends ``failed`` too, its
report and summary the verdict all the same, its error naming the record's file and errno.
"""

from typing import Any, Final

import structlog

from engine.app.check import CheckRequest, check_lines, check_restore_point, not_saved_line
from engine.app.stores import JobStore
from engine.config.policy import RestoreCheck
from engine.daemon.context import DaemonContext
from engine.daemon.jobs import Busy, JobView
from engine.restore.record import RecordNotSaved
from engine.store.manifest import POLICY_TAG

log = structlog.get_logger("tessera.checks")

CHECK_KIND: Final = "check"
# A check job's "VM": per snapshot, so never the VM's own (no last-success gauge for it)
CHECK_VM_PREFIX: Final = "snapshot:"


def start_check(
    ctx: DaemonContext,
    handle: JobStore,
    request: CheckRequest,
    *,
    policy: str | None = None,
) -> JobView:
    """Submit a check of ``request.snapshot`` in ``handle``'s store as a job. Raises
    SnapshotNotFound and ConfigError (a bad expected path) before the job starts; Busy when
    that snapshot is being checked already."""
    request.check()
    snapshot_id = handle.store.resolve(request.snapshot)
    manifest = handle.store.manifest(snapshot_id)
    request = CheckRequest(snapshot_id, request.disks, request.expect, request.launch_timeout)

    async def body(view: JobView) -> tuple[str, dict[str, Any]]:
        not_saved: RecordNotSaved | None = None
        try:
            record = await check_restore_point(handle.store, request, handle.pool)
        except RecordNotSaved as e:
            record, not_saved = e.record, e
        view.outcome = record
        for line in check_lines(record):
            view.say(line)
        if record.outcome != "passed":
            view.error = record.summary()
        if not_saved is not None:
            view.say(not_saved_line(not_saved))
            view.error = f"{record.summary()}; {not_saved_line(not_saved)}"
            return "failed", record.doc()
        return ("succeeded" if record.outcome == "passed" else "failed"), record.doc()

    params: dict[str, Any] = {"store": handle.name, "snapshot": snapshot_id}
    params |= {"vm_name": manifest.vm_name}
    params |= {"expect": list(request.expect)} if request.expect else {}
    vm = f"{CHECK_VM_PREFIX}{snapshot_id}"
    return ctx.jobs.submit(CHECK_KIND, vm, body, policy=policy, params=params)


def policy_request(snapshot_id: str, rules: RestoreCheck) -> CheckRequest:
    """What a policy's ``restore_check`` asks for one new snapshot."""
    timeout = rules.launch_timeout.delta.total_seconds() if rules.launch_timeout else None
    return CheckRequest(snapshot_id, rules.disks, rules.expect, timeout)


def start_newest(ctx: DaemonContext, handle: JobStore) -> list[JobView]:
    """A check job for the newest snapshot of each VM in ``handle``'s store; a snapshot
    being checked already is left to that job."""
    newest: dict[str, str] = {}
    for entry in handle.store.snapshots():  # oldest first
        newest[entry.vm_id] = entry.snapshot_id
    rules = {p.name: p.restore_check for p in ctx.policies if p.restore_check is not None}
    views = []
    for snapshot_id in newest.values():
        made_by = handle.store.manifest(snapshot_id).tags.get(POLICY_TAG)
        policy_rules = rules.get(made_by) if made_by else None
        request = (
            policy_request(snapshot_id, policy_rules)
            if policy_rules is not None
            else CheckRequest(snapshot_id)
        )
        try:
            views.append(start_check(ctx, handle, request))
        except Busy as e:
            log.info("check.busy", snapshot=snapshot_id, error=str(e))
    return views
