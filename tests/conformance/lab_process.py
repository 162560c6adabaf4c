"""``python -m tests.conformance.lab_process DIR``: the lab of ``tessera lab up`` with the VM
the SDK's older examples look for by name (``myvm``), run in the foreground until SIGTERM."""

import asyncio
import sys
from dataclasses import replace
from pathlib import Path

from engine.core.units import GiB
from plugins.lab.engine.state import DiskSeed, Seed, VmSeed
from plugins.lab.lab import lab_seed

MYVM = "myvm"  # page_vms.py, follow_vm_links.py, add_vm_snapshot.py: search='name=myvm'


def conformance_seed() -> Seed:
    base = lab_seed()
    myvm = VmSeed(name=MYVM, disks=(DiskSeed(f"{MYVM}_os", 1 * GiB, bootable=True),))
    return replace(base, vms=(*base.vms, myvm))


if __name__ == "__main__":
    from plugins.lab.lab import run

    asyncio.run(run(Path(sys.argv[1]).resolve(), conformance_seed()))
