"""Store maintenance, from typed options to typed results: the one path for ``tessera gc``,
``tessera store verify`` and the daemon's scheduled or requested ``gc`` / ``verify`` jobs.

::

    GcOptions      → run_gc(store, options)         → GcResult       (engine.maint.gc)
    VerifyOptions  → run_verify(store, options)     → VerifyResult   (engine.maint.verify)

Both are blocking, resumable walks of the store; these run them in a thread so an event
loop (the daemon's, or the command line's) keeps serving while they work. GC takes the
store open for writing and honours the leases of running backups; verify reads. What a
result says in lines of text (``finding_line``, ``verify_lines``) is written here once for
the terminal and the daemon's job log.
"""

import asyncio

from engine.core.units import human_bytes
from engine.maint.check import Finding
from engine.maint.gc import GcOptions, GcResult, gc
from engine.maint.verify import VerifyOptions, VerifyResult, verify
from engine.store.chunk_store import Store


async def run_gc(store: Store, options: GcOptions) -> GcResult:
    return await asyncio.to_thread(gc, store, options)


async def run_verify(store: Store, options: VerifyOptions) -> VerifyResult:
    return await asyncio.to_thread(verify, store, options)


def finding_line(f: Finding) -> str:
    """One finding: its kind, message and the snapshots and VMs it hurts."""
    who = []
    if f.snapshots:
        who.append(f"snapshots: {', '.join(f.snapshots)}")
    if f.vms:
        who.append(f"VMs: {', '.join(f.vms)}")
    return f"{f.kind}: {f.message}" + (f" ({'; '.join(who)})" if who else "")


def verify_lines(result: VerifyResult) -> list[str]:
    """The report of a verify: findings, the data run, damaged snapshots, the verdict."""
    lines = [finding_line(f) for f in result.findings]
    what = ""
    if result.data:
        what = f", {result.chunks_checked} chunks read ({human_bytes(result.bytes_checked)})"
        run = f"run {result.run}" + (" (resumed)" if result.resumed else "")
        lines.append(
            f"{run}: {result.packs_checked} packs read now, {result.packs_in_run} of "
            f"{result.packs_total} in the run ({result.percent:g} %), least recently verified "
            "first"
        )
    if result.damaged:
        lines.append(
            f"damaged snapshots: {', '.join(result.damaged)} (VMs: {', '.join(result.vms)})"
        )
    if result.undamaged:
        lines.append(f"no longer damaged: {', '.join(result.undamaged)}")
    lines.append(
        f"verified {result.snapshots} snapshots{what}: "
        + ("ok" if result.ok else f"{len(result.findings)} problems")
    )
    return lines
