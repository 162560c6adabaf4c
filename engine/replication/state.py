"""Per-peer replication state of a sending store: ``STORE/replication/<peer>.json``.

For each VM, the last snapshot this store replicated to the peer (committed there). The
next session diffs against it, so an incremental offers only the slots that changed. The
file is rewritten atomically after each commit; losing it only means the next session
offers every id of its snapshot (the receiver still answers which it lacks).
"""

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from engine.core.errors import ConfigError
from engine.util.fs import atomic_write

_PEER_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def check_peer_name(name: str) -> str:
    if not _PEER_NAME.match(name):
        raise ConfigError(message=f"peer name {name!r}: letters, digits, '.', '_', '-' only")
    return name


def state_dir(store_root: Path) -> Path:
    return store_root / "replication"


@dataclass
class PeerState:
    path: Path
    peer: str
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, store_root: Path, peer: str) -> "PeerState":
        path = state_dir(store_root) / f"{check_peer_name(peer)}.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path, peer)
        except (OSError, ValueError) as e:
            raise ConfigError(message=f"replication state {path}: {e}") from e
        return cls(path, peer, dict(doc.get("vms", {})))

    def last(self, vm_id: str) -> str | None:
        entry = self.vms.get(vm_id)
        return str(entry["snapshot"]) if entry else None

    def replicated(self, vm_id: str, snapshot_id: str, snapshot_time: str) -> None:
        """Record a committed replica and save, unless an older snapshot than the last."""
        entry = self.vms.get(vm_id)
        if entry and entry.get("time", "") > snapshot_time:
            return
        self.vms[vm_id] = {
            "snapshot": snapshot_id,
            "time": snapshot_time,
            "replicated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"peer": self.peer, "vms": self.vms}
        atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n", "replication.state")
