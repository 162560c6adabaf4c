"""A store writer that SIGKILLs itself at the N-th hit of a failpoint (crash tests).

    python -m tests.integration.crash_writer STORE POINT N SEED [--during-open]

Writes snapshot "B" of two disks built from SEED. Prints ``committed <id>`` when the commit
returns. Exit status: killed by SIGKILL when the point was reached, 0 if it never was.
"""

import random
import sys
from pathlib import Path

from engine.store.chunk_store import Store
from engine.util import failpoints
from tests.conftest import PASSPHRASE
from tests.helpers import realistic_bytes, sigkill_at, write_snapshot


def disks_b(seed: int, chunk: int) -> dict[str, bytes]:
    """Two disks: d0 is snapshot A's disk with one slot changed (dedup path), d1 is new,
    mostly incompressible data spanning several 1 MiB packs, plus a zero slot."""
    changed = bytearray(realistic_bytes(24 * chunk, seed=100))  # = snapshot A's disk
    changed[3 * chunk : 3 * chunk + 50] = b"B" * 50
    rng = random.Random(seed)
    fresh = realistic_bytes(8 * chunk, seed=seed) + rng.randbytes(24 * chunk) + bytes(chunk)
    return {"d0": bytes(changed), "d1": fresh}


def main() -> None:
    store_path, point, nth, seed = (
        Path(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    handler = sigkill_at(point, nth)
    if "--during-open" in sys.argv:  # crash the recovery that opening runs
        failpoints.install(handler)
    store = Store.open(store_path, passphrase=PASSPHRASE)
    failpoints.install(handler)
    m = write_snapshot(store, "vm-b", disks_b(seed, store.config.chunk_size))
    print(f"committed {m.snapshot_id}", flush=True)
    store.close()


if __name__ == "__main__":
    main()
