"""The mirror's crash journal (leg states, dirty regions, writes in flight).

No device needed: the C target is created and freed in this process, as a
recovering server does, and the journal file is inspected and edited
directly, as a server killed mid-write would have left it.  The layout
constants below mirror ``struct mirror_journal`` in ublkml.c.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ublk_driver.core.errors import TargetError
from ublk_driver.targets import MirrorTarget

HEADER = 128
STATES_OFF = 20          # magic[8], version, n_legs, region_shift, then states
RESYNC_OFF = 40          # after size and n_regions (u64 each)
REGION = 1 << 16
SIZE = 16 * REGION
N_REGIONS = SIZE // REGION
STATE = {"active": 0, "demoted": 1, "failed": 2}


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("UBLKML_STATE_DIR", str(d))
    return d


def make_legs(tmp_path: Path, n: int = 2, fill: bytes = b"") -> list[str]:
    legs = []
    for i in range(n):
        p = tmp_path / f"leg{i}.img"
        p.write_bytes(fill * (SIZE // len(fill)) if fill else bytes(SIZE))
        legs.append(str(p))
    return legs


def open_mirror(legs: list[str], recovering: bool, dev_id: int = 7) -> MirrorTarget:
    m = MirrorTarget(legs, direct=False, region_size=REGION)
    m.bind(dev_id, recovering)
    m.attach()
    return m


def crash(m: MirrorTarget) -> None:
    """What a SIGKILL leaves: the journal file as it is (the C target's memory
    is freed without any clean-up of the journal)."""
    assert m._ctarget is not None
    m._ctarget.free()
    m.close()


def inflight_off(r: int) -> int:
    return HEADER + 4 * r


def dirty_off(leg: int, r: int) -> int:
    inflight = (4 * N_REGIONS + 7) & ~7
    words = (N_REGIONS + 63) // 64
    return HEADER + inflight + 8 * (leg * words + r // 64)


def test_fresh_journal_layout_and_states_survive_a_crash(tmp_path: Path) -> None:
    m = open_mirror(make_legs(tmp_path), recovering=False)
    assert m.journal is not None
    data = Path(m.journal).read_bytes()
    assert data[:8] == b"ublkmlMJ"
    assert len(data) == HEADER + ((4 * N_REGIONS + 7) & ~7) + 2 * 8
    m.set_leg_state(1, "demoted")
    assert struct.unpack_from("<I", Path(m.journal).read_bytes(), STATES_OFF)[0] == 1 << 2
    crash(m)

    m2 = open_mirror(make_legs(tmp_path), recovering=True)
    assert [leg.state for leg in m2.leg_info()] == ["active", "demoted"]
    crash(m2)


def test_a_new_add_starts_a_fresh_journal(tmp_path: Path) -> None:
    m = open_mirror(make_legs(tmp_path), recovering=False)
    m.set_leg_state(0, "failed")
    crash(m)
    m2 = open_mirror(make_legs(tmp_path), recovering=False)
    assert [leg.state for leg in m2.leg_info()] == ["active", "active"]
    crash(m2)


def test_recovery_without_journal_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="no journal"):
        open_mirror(make_legs(tmp_path), recovering=True, dev_id=99)


def test_journal_of_another_mirror_is_refused(tmp_path: Path) -> None:
    m = open_mirror(make_legs(tmp_path), recovering=False)
    crash(m)
    legs3 = make_legs(tmp_path, 3)
    with pytest.raises(TargetError, match="does not describe this mirror"):
        open_mirror(legs3, recovering=True)


def test_damaged_journal_is_refused(tmp_path: Path) -> None:
    m = open_mirror(make_legs(tmp_path), recovering=False)
    crash(m)
    assert m.journal is not None
    with open(m.journal, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(TargetError, match="does not describe this mirror"):
        open_mirror(make_legs(tmp_path), recovering=True)


def test_regions_with_writes_in_flight_are_made_equal(tmp_path: Path) -> None:
    """A write to region 3 reached leg 0 only when the server died: the next
    server copies that region from the first active leg to the other one."""
    legs = make_legs(tmp_path)
    m = open_mirror(legs, recovering=False)
    crash(m)
    with open(legs[0], "r+b") as f:
        f.seek(3 * REGION)
        f.write(b"\xab" * REGION)
    assert m.journal is not None
    with open(m.journal, "r+b") as f:
        f.seek(inflight_off(3))
        f.write(struct.pack("<I", 2))
    m2 = open_mirror(legs, recovering=True)
    assert Path(legs[0]).read_bytes() == Path(legs[1]).read_bytes()
    assert struct.unpack_from("<I", Path(m.journal).read_bytes(), inflight_off(3))[0] == 0
    crash(m2)


def test_an_interrupted_resync_copy_is_redone(tmp_path: Path) -> None:
    """The server died while copying region 5 to leg 1 (dirty bit already
    cleared): the region is dirty again for the next server."""
    legs = make_legs(tmp_path)
    m = open_mirror(legs, recovering=False)
    m.set_leg_state(1, "demoted")
    crash(m)
    assert m.journal is not None
    with open(m.journal, "r+b") as f:
        f.seek(RESYNC_OFF + 4 * 1)
        f.write(struct.pack("<I", 5 + 1))
    m2 = open_mirror(legs, recovering=True)
    info = m2.leg_info()[1]
    assert (info.state, info.dirty_regions) == ("demoted", 1)
    assert m2.resync(1) == 0
    crash(m2)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(states=st.lists(st.sampled_from(["active", "demoted", "failed"]), min_size=3,
                       max_size=3).filter(lambda s: "active" in s),
       dirty=st.lists(st.sets(st.integers(0, N_REGIONS - 1), max_size=N_REGIONS),
                      min_size=3, max_size=3),
       inflight=st.sets(st.integers(0, N_REGIONS - 1), max_size=4))
def test_replay_model(tmp_path_factory: pytest.TempPathFactory, states: list[str],
                      dirty: list[set[int]], inflight: set[int]) -> None:
    """Whatever a crash left: states kept; dirty counts are the bits set, plus
    in-flight regions on demoted legs; active legs end equal on in-flight
    regions; failed legs are left alone."""
    tmp = tmp_path_factory.mktemp("replay")
    os.environ["UBLKML_STATE_DIR"] = str(tmp / "state")
    legs = []
    for i in range(3):
        p = tmp / f"leg{i}.img"
        p.write_bytes(bytes([i + 1]) * SIZE)  # every leg differs everywhere
        legs.append(str(p))
    m = open_mirror(legs, recovering=False)
    crash(m)
    assert m.journal is not None
    with open(m.journal, "r+b") as f:
        word = sum(STATE[s] << (2 * i) for i, s in enumerate(states))
        f.seek(STATES_OFF)
        f.write(struct.pack("<I", word))
        for r in inflight:
            f.seek(inflight_off(r))
            f.write(struct.pack("<I", 1))
        for leg, regions in enumerate(dirty):
            bits = sum(1 << r for r in regions)
            f.seek(dirty_off(leg, 0))
            f.write(struct.pack("<Q", bits))
    m2 = open_mirror(legs, recovering=True)
    info = m2.leg_info()
    src = states.index("active")
    data = [Path(p).read_bytes() for p in legs]
    for i, s in enumerate(states):
        assert info[i].state == s
        want = dirty[i] | (inflight if s == "demoted" else set())
        assert info[i].dirty_regions == len(want)
        for r in inflight:
            same = data[i][r * REGION:(r + 1) * REGION] == data[src][r * REGION:(r + 1) * REGION]
            assert same == (s == "active"), (i, s, r)
    crash(m2)
