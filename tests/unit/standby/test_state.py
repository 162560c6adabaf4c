"""Standby state: atomic round trip, base maps (dirty, missing, damaged → no base), discard,
and the layout changes that force a full run."""

from pathlib import Path

import pytest

from engine.core.ids import ZERO_ID
from engine.standby import state as st
from engine.standby.job import layout_change
from engine.store import diskmap
from engine.store.manifest import Manifest
from tests.conftest import StoreFactory
from tests.helpers import realistic_bytes, write_snapshot

CHUNK = 64 * 1024


def a_state() -> st.StandbyState:
    state = st.StandbyState("vm-id", "vm1", "sb-id", "vm1-standby", snapshot_id="s1")
    state.disks["d1"] = st.StandbyDisk("sd1", 2 * CHUNK, "os", applied="s1")
    return state


def test_round_trip_and_discard(tmp_path: Path) -> None:
    assert st.load(tmp_path, "vm-id") is None
    state = a_state()
    state.note(mode="full", snapshot="s1", reason="first refresh")
    st.save(tmp_path, state)
    loaded = st.load(tmp_path, "vm-id")
    assert loaded is not None
    assert loaded.disks == state.disks
    assert loaded.history[0]["reason"] == "first refresh"
    st.discard(tmp_path, "vm-id")
    assert st.load(tmp_path, "vm-id") is None


def test_history_is_bounded() -> None:
    state = a_state()
    for i in range(st.KEEP_HISTORY + 5):
        state.note(mode="refresh", snapshot=str(i))
    assert len(state.history) == st.KEEP_HISTORY
    assert state.history[-1]["snapshot"] == str(st.KEEP_HISTORY + 4)


def test_unreadable_state_names_its_path(tmp_path: Path) -> None:
    st.state_path(tmp_path, "vm-id").parent.mkdir(parents=True)
    st.state_path(tmp_path, "vm-id").write_text("{}")
    with pytest.raises(st.StandbyStateError, match=r"vm-id\.json: unreadable"):
        st.load(tmp_path, "vm-id")


@pytest.mark.parametrize("bad", ["../x", "", ".hidden"])
def test_ids_must_be_file_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="file name"):
        st.state_path(tmp_path, bad)


def test_base_map_rules(tmp_path: Path) -> None:
    state = a_state()
    assert st.open_base(tmp_path, state, "d1") is None  # no map yet
    source = tmp_path / "source.map"
    source.write_bytes(diskmap.encode(CHUNK, 2 * CHUNK, ZERO_ID * 2))
    st.publish_map(tmp_path, "vm-id", "d1", source)
    base = st.open_base(tmp_path, state, "d1")
    assert base is not None
    with base:
        assert base.slots == 2
    state.disks["d1"].dirty = True
    assert st.open_base(tmp_path, state, "d1") is None  # dirty: write every slot
    state.disks["d1"].dirty = False
    path = st.map_path(tmp_path, "vm-id", "d1")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert st.open_base(tmp_path, state, "d1") is None  # damaged copy: a full write repairs
    assert st.open_base(tmp_path, state, "other") is None


def snapshot(make_store: StoreFactory, disks: dict[str, int]) -> Manifest:
    store = make_store(name=f"store{len(disks)}-{sum(disks.values())}", chunk_size=CHUNK)
    return write_snapshot(store, "vm", {d: realistic_bytes(n, seed=1) for d, n in disks.items()})


def test_layout_changes(make_store: StoreFactory) -> None:
    state = a_state()
    assert layout_change(state, snapshot(make_store, {"d1": 2 * CHUNK})) is None
    grew = layout_change(state, snapshot(make_store, {"d1": 3 * CHUNK}))
    assert grew == f"disk d1 changed size from {2 * CHUNK} to {3 * CHUNK} bytes"
    added = layout_change(state, snapshot(make_store, {"d1": 2 * CHUNK, "d2": CHUNK}))
    assert added == "the VM's disks changed (added: d2; removed: none)"
