"""A typed outcome's document (``JobView.summary``): built here once, for the API, the
daemon's log and the job history, which outlives the typed outcome (a restarted daemon shows
its jobs from ``history.db``).

Everything that needs to know about an outcome (the policy run, metrics, e-mails) reads the
typed outcome on the job (``JobView.outcome``); these dicts are only what is shown and kept.
"""

from typing import Any

from engine.app.restore import VmRestoreOutcome
from engine.jobs.backup import BackupOutcome
from engine.maint.gc import GcResult
from engine.maint.verify import VerifyResult
from engine.replication.job import ReplicationOutcome
from engine.standby.job import StandbyOutcome


def backup_doc(outcome: BackupOutcome) -> dict[str, Any]:
    return {
        "snapshot": outcome.manifest.snapshot_id if outcome.manifest else None,
        "level": outcome.level,
        "seconds": round(outcome.seconds, 2),
        "bytes_read": sum(d.bytes_read for d in outcome.disks),
        "bytes_stored": sum(d.bytes_stored for d in outcome.disks),
        "disk_stats": [
            {
                "disk": d.disk_id,
                "bytes_read": d.bytes_read,
                "bytes_stored": d.bytes_stored,
                "new_chunks": d.new_chunks,
                "line": d.summary(),
            }
            for d in outcome.disks
        ],
        "integrity": outcome.record.integrity,
        "new_chunks": sum(d.new_chunks for d in outcome.disks),
        "known_chunks": sum(d.known_chunks for d in outcome.disks),
        "line": outcome.summary(),
    }


def vm_restore_doc(outcome: VmRestoreOutcome) -> dict[str, Any]:
    doc: dict[str, Any] = {"line": outcome.restore.summary()}
    if outcome.vm is not None:
        doc |= {"vm_id": outcome.vm.id, "vm_name": outcome.vm.name}
    return doc


def standby_doc(outcome: StandbyOutcome) -> dict[str, Any]:
    return {
        "mode": outcome.mode,
        "reason": outcome.reason,
        "standby_vm": outcome.standby_vm_name,
        "slots_written": outcome.slots_written,
        "slots_skipped": outcome.slots_skipped,
        "bytes_written": outcome.bytes_written,
        "seconds": round(outcome.seconds, 2),
        "line": outcome.summary(),
    }


def replication_doc(outcome: ReplicationOutcome) -> dict[str, Any]:
    return outcome.record.summary | {"line": outcome.summary(), "peer": outcome.peer}


def gc_doc(result: GcResult) -> dict[str, Any]:
    return result.doc() | {"seconds": round(result.seconds, 2)}


def verify_doc(result: VerifyResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "findings": len(result.findings),
        "damaged": result.damaged,
        "vms": result.vms,
        "packs_checked": result.packs_checked,
        "chunks_checked": result.chunks_checked,
        "seconds": round(result.seconds, 2),
        "integrity": not result.ok,
    }
