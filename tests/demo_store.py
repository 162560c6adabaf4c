"""``make demo`` until the lab demo lands: a tour of the store on a generated disk image.

Creates a store, backs up an ext4 image of real files as snapshot 1, a "cloned VM" with a
few changed blocks as snapshot 2, then shows what dedup and compression saved and verifies
every record.
"""

import random
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.core.ids import ZERO_ID
from engine.store.chunk_store import Store
from tests.bench.data import fs_image


def backup(store: Store, vm: str, image: bytes) -> str:
    size = store.config.chunk_size
    with store.begin_snapshot(vm, vm, "full") as snap:
        dm = snap.add_disk(f"{vm}-disk0", "disk0", len(image))
        for slot, start in enumerate(range(0, len(image), size)):
            chunk = image[start : start + size]
            dm.set(slot, store.put_chunk(chunk) if any(chunk) else ZERO_ID)
        return snap.commit().snapshot_id


def tessera(*args: str) -> None:
    print("$ tessera " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "engine.daemon.cli", *args], check=True)


def main() -> None:
    image = fs_image(256).read_bytes()
    clone = bytearray(image)
    rng = random.Random(1)
    for _ in range(20):  # the clone differs in 20 scattered 4 KiB blocks
        pos = rng.randrange(0, len(clone) - 4096) & ~4095
        clone[pos : pos + 4096] = rng.randbytes(4096)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        (Path(tmp) / "pass").write_text("demo passphrase\n")
        tessera("store", "init", str(path), "--passphrase-file", str(Path(tmp) / "pass"))
        with Store.open(path, passphrase=b"demo passphrase") as store:
            print(f"backed up vm-template as snapshot {backup(store, 'vm-template', image)}")
            print(f"backed up vm-clone    as snapshot {backup(store, 'vm-clone', bytes(clone))}")
        tessera("store", "info", str(path), "--passphrase-file", str(Path(tmp) / "pass"))
        tessera(
            "store", "verify", str(path), "--data", "--passphrase-file", str(Path(tmp) / "pass")
        )


if __name__ == "__main__":
    main()
