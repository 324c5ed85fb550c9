"""The mirror target in harness queues: real legs (files), real io_uring, no kernel driver.

The one fake is the ublk driver's descriptor array, written by ``inject``.
The reference model is a single block device: whatever legs do, reads must
match it, and after a promotion every leg must hold exactly its content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ublk_driver.targets.model import Model, payload
from tests.ublk_driver.ublk_helpers import sparse_files
from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError, TargetError
from ublk_driver.faults import FaultSpec
from ublk_driver.queue import default_ring_flags
from ublk_driver.records import COMPLETION_DTYPE, RECORD_PROBED
from ublk_driver.targets import MirrorTarget
from ublk_driver.uapi import IoFlag, Op

SIZE = 1 << 20
REGION = 64 << 10
BUF = 128 << 10
DEPTH = 4


def make_legs(tmp_path: Path, n: int = 2, size: int = SIZE) -> list[str]:
    return sparse_files(tmp_path, n, size)


class Rig:
    """A mirror, its C target and one harness queue."""

    def __init__(self, legs: list[str], ring_flags: int | None = None,
                 records: bool = False) -> None:
        self.mirror = MirrorTarget(legs, region_size=REGION)
        self.ct = self.mirror.attach()
        self.q = _bindings.Queue(self.ct, -1, 0, DEPTH, BUF, True,
                                 default_ring_flags() if ring_flags is None else ring_flags)
        if records:
            self.q.enable_records(1 << 12)
        self.batch = _bindings.EventBatch(DEPTH)

    def io(self, op: int, off: int, length: int, data: bytes = b"", tag: int = 0) -> int:
        if data:
            self.q.buffer(tag)[:len(data)] = data
        self.q.inject(tag, op, off // 512, length // 512 if op != Op.FLUSH else 0)
        res = self.q.harvest(self.batch)
        assert len(res) == 1 and res[0][0] == tag
        return res[0][1]

    def read(self, off: int, length: int) -> bytes:
        assert self.io(Op.READ, off, length) == length
        return bytes(self.q.buffer(0)[:length])

    def drain(self) -> None:
        """Let probes and delays still in flight finish."""
        assert self.q.harvest(self.batch) == []

    def records(self) -> np.ndarray:
        buf = np.empty(4096, dtype=COMPLETION_DTYPE)
        return buf[:self.q.read_records(buf)]

    def close(self) -> None:
        self.q.free()
        self.ct.free()
        self.mirror.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(make_legs(tmp_path), records=True)
    yield r
    r.close()


def leg_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def state(r: Rig, leg: int) -> str:
    return r.mirror.leg_info()[leg].state


# ---- basics ---------------------------------------------------------------------


def test_writes_reach_every_leg_and_records_are_per_leg(rig: Rig) -> None:
    data = payload(3, 8192, 16384)
    assert rig.io(Op.WRITE | IoFlag.FUA, 8192, 16384, data) == 16384
    assert rig.io(Op.FLUSH, 0, 0) == 0
    for path in rig.mirror.legs:
        assert leg_bytes(path)[8192:8192 + 16384] == data
    recs = rig.records()
    writes = recs[recs["op"] == Op.WRITE]
    assert sorted(writes["path"]) == [0, 1]          # one record per leg I/O
    assert all(writes["result"] == 16384) and all(writes["offset"] == 8192)
    assert sorted(recs[recs["op"] == Op.FLUSH]["path"]) == [0, 1]
    info = rig.mirror.leg_info()
    assert [i.writes for i in info] == [2, 2] and [i.state for i in info] == ["active"] * 2


def test_reads_round_robin_over_active_legs(rig: Rig) -> None:
    for _ in range(10):
        rig.read(0, 4096)
    assert [i.reads for i in rig.mirror.leg_info()] == [5, 5]
    rig.mirror.set_leg_state(0, "demoted")
    rig.mirror.set_probe_every(0)
    for _ in range(6):
        rig.read(0, 4096)
    assert [i.reads for i in rig.mirror.leg_info()] == [5, 11]


def test_the_last_active_leg_stays(rig: Rig) -> None:
    rig.mirror.set_leg_state(0, "demoted")
    with pytest.raises(ConfigError, match="last active leg"):
        rig.mirror.set_leg_state(1, "failed")
    with pytest.raises(ConfigError, match="last active leg"):
        rig.mirror.set_leg_state(1, "demoted")
    assert state(rig, 1) == "active"


def test_a_stale_leg_cannot_be_activated_without_resync(rig: Rig) -> None:
    rig.mirror.set_leg_state(1, "failed")
    data = payload(9, 0, 8192)
    assert rig.io(Op.WRITE, REGION * 3, 8192, data) == 8192
    info = rig.mirror.leg_info()[1]
    assert info.dirty_regions == 1 and info.writes == 0
    with pytest.raises(ConfigError, match="1 dirty region"):
        rig.mirror.set_leg_state(1, "active")
    assert rig.mirror.resync(1, 10) == 0
    assert state(rig, 1) == "demoted"         # resync makes a failed leg written again
    rig.mirror.set_leg_state(1, "active")
    assert leg_bytes(rig.mirror.legs[1]) == leg_bytes(rig.mirror.legs[0])


def test_read_error_is_retried_on_the_other_leg(rig: Rig) -> None:
    data = payload(1, 0, 65536)
    assert rig.io(Op.WRITE, 0, 65536, data) == 65536
    rig.mirror.set_fault(0, FaultSpec(error_ppm=1_000_000, ops=("read",)))
    for _ in range(4):
        assert rig.read(0, 65536) == data           # the user never sees leg 0's error
    info = rig.mirror.leg_info()
    assert info[0].state == "failed" and info[0].errors == 1
    assert info[0].dirty_regions == 1               # the region is rewritten by resync
    recs = rig.records()
    reads = recs[recs["op"] == Op.READ]
    assert (reads["path"] == 0).sum() == 1 and reads[reads["path"] == 0]["result"][0] == -5
    rig.mirror.set_fault(0, None)
    rig.mirror.promote(0)
    assert state(rig, 0) == "active"


def test_write_error_fails_the_leg_not_the_request(rig: Rig) -> None:
    rig.mirror.set_fault(1, FaultSpec(error_ppm=1_000_000, ops=("write",),
                                      errno=errno.ENOSPC))
    data = payload(5, 4096, 4096)
    assert rig.io(Op.WRITE, 4096, 4096, data) == 4096
    info = rig.mirror.leg_info()[1]
    assert info.state == "failed" and info.dirty_regions == 1
    recs = rig.records()
    assert list(recs[recs["path"] == 1]["result"]) == [-errno.ENOSPC]
    rig.mirror.set_fault(1, None)
    rig.mirror.promote(1)
    assert leg_bytes(rig.mirror.legs[1]) == leg_bytes(rig.mirror.legs[0])


def test_write_failing_on_the_last_active_leg_fails(rig: Rig) -> None:
    rig.mirror.set_leg_state(1, "demoted")
    rig.mirror.set_fault(0, FaultSpec(error_ppm=1_000_000, ops=("write",)))
    assert rig.io(Op.WRITE, 0, 4096, bytes(4096)) == -errno.EIO
    assert state(rig, 0) == "active"   # cannot fail: it is the only leg read


def test_probes_read_demoted_legs_and_make_records(rig: Rig) -> None:
    rig.mirror.set_leg_state(1, "demoted")
    rig.mirror.set_probe_every(2)
    for _ in range(10):
        rig.read(0, 4096)
        rig.drain()
    info = rig.mirror.leg_info()
    assert info[0].reads == 10 and info[1].reads == 0
    assert info[1].probes == 5
    recs = rig.records()
    probes = recs[recs["tag"] == _bindings.PROBE_TAG]
    assert len(probes) == 5 and set(probes["path"]) == {1}
    # The user reads the probes went out with are flagged (the probes' peers).
    reads = recs[recs["tag"] != _bindings.PROBE_TAG]
    probed = reads[(reads["flags"] & RECORD_PROBED) != 0]
    assert len(reads) == 10 and len(probed) == 5 and set(probed["path"]) == {0}
    assert sorted(probed["offset"]) == sorted(probes["offset"])
    assert _bindings.REC_PROBED == RECORD_PROBED
    # A slow leg: its probes show the fault; at most 4 are outstanding (slots).
    rig.mirror.set_fault(1, FaultSpec(delay_us=3000))
    for _ in range(20):
        rig.read(0, 4096)
    rig.drain()
    recs = rig.records()
    probes = recs[recs["tag"] == _bindings.PROBE_TAG]
    assert 4 <= len(probes) <= 10
    assert probes["lat_ns"].min() >= 3_000_000
    assert rig.mirror.leg_info()[1].probes == 5 + len(probes)


def test_mirror_config_errors(tmp_path: Path) -> None:
    legs = make_legs(tmp_path, 3)
    with pytest.raises(ConfigError, match=r"2\.\.8 legs"):
        MirrorTarget(legs[:1])
    with pytest.raises(ConfigError, match="same file"):
        MirrorTarget([legs[0], legs[0]])
    with pytest.raises(ConfigError, match="power of two"):
        MirrorTarget(legs, region_size=3000)
    with pytest.raises(TargetError, match="No such file"):
        MirrorTarget([legs[0], str(tmp_path / "absent")])
    m = MirrorTarget(legs)
    try:
        with pytest.raises(ConfigError, match="not started"):
            m.leg_info()
        with pytest.raises(ConfigError, match="fault path 3 does not exist"):
            m.set_fault(3, FaultSpec(delay_us=1))
    finally:
        m.close()


def test_smallest_leg_sets_the_size(tmp_path: Path) -> None:
    a, b = make_legs(tmp_path, 2)
    os.truncate(b, SIZE // 2)
    m = MirrorTarget([a, b])
    try:
        assert m.size == SIZE // 2
    finally:
        m.close()


# ---- the reference model ----------------------------------------------------------

STATES = ("active", "demoted", "failed")


@st.composite
def mirror_ops(draw: st.DrawFn) -> list[tuple[str, int, int, int]]:
    """("io", op, off, len) with a seed in len's place for writes, ("state", leg, state),
    ("resync", leg), ("promote", leg), ("fault", leg, on)."""
    out: list[tuple[str, int, int, int]] = []
    sectors = SIZE // 512
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["io", "io", "io", "io", "state", "resync", "promote",
                                     "fault"]))
        if kind == "io":
            op = draw(st.sampled_from([Op.READ, Op.READ, Op.WRITE, Op.WRITE, Op.FLUSH,
                                       Op.DISCARD, Op.WRITE_ZEROES]))
            n = draw(st.integers(1, BUF // 512))
            start = draw(st.integers(0, sectors - n))
            out.append(("io", int(op), start * 512, n * 512))
        elif kind == "state":
            out.append(("state", draw(st.integers(0, 2)), draw(st.integers(0, 2)), 0))
        elif kind == "fault":
            out.append(("fault", draw(st.integers(0, 2)), draw(st.integers(0, 1)), 0))
        else:
            out.append((kind, draw(st.integers(0, 2)), 0, 0))
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mirror_ops(), st.integers(0, 255))
def test_mirror_matches_a_single_disk(tmp_path_factory: pytest.TempPathFactory,
                                      ops: list[tuple[str, int, int, int]], seed: int) -> None:
    """Random I/O, leg state changes, failing legs, resyncs: reads always match the
    model (never a stale leg), and after promoting every leg all legs hold it."""
    legs = make_legs(tmp_path_factory.mktemp("m"), 3)
    r = Rig(legs)
    model = Model(SIZE, discard_zeroes=True)
    try:
        faulty: set[int] = set()
        for i, (kind, a, b, c) in enumerate(ops):
            if kind == "io":
                op, off, length = a, b, c
                active = {x.leg for x in r.mirror.leg_info() if x.state == "active"}
                data = payload(seed + i, off, length) if op == Op.WRITE else b""
                want = length if op in (Op.READ, Op.WRITE) else 0
                res = r.io(op, off, length, data)
                if res != want:
                    # Only when every leg that could serve it is failing.
                    assert res == -errno.EIO and active <= faulty, (res, active, faulty)
                    if op != Op.READ and op != Op.FLUSH:
                        model.undefined |= set(range(off // 512, (off + length) // 512))
                elif op == Op.WRITE:
                    model.apply(op, off, data)
                elif op == Op.READ:
                    model.check(off, bytes(r.q.buffer(0)[:length]))
                elif op != Op.FLUSH:
                    model.zero(off, length, is_discard=op == Op.DISCARD)
            elif kind == "state":
                # Refused (last active leg, stale leg): nothing changes.
                with contextlib.suppress(ConfigError):
                    r.mirror.set_leg_state(a, STATES[b])
            elif kind == "resync":
                try:
                    r.mirror.resync(a, 1000)
                except TargetError:
                    assert a in faulty
            elif kind == "promote":
                try:
                    r.mirror.promote(a, timeout=5)
                except TargetError:
                    assert a in faulty   # its resync writes fail
            else:
                # A leg that fails every write and read while on: it becomes FAILED
                # at its next I/O unless it is the last active leg.
                r.mirror.set_fault(a, FaultSpec(error_ppm=1_000_000) if b else None)
                (faulty.add if b else faulty.discard)(a)
        for leg in range(3):
            r.mirror.set_fault(leg, None)
        for leg in range(3):
            r.mirror.promote(leg)
        assert [i.state for i in r.mirror.leg_info()] == ["active"] * 3
        for off in range(0, SIZE, BUF):
            model.check(off, r.read(off, BUF))
    finally:
        r.close()
    for path in legs:
        model.check(0, leg_bytes(path))


def test_many_tags_in_flight(tmp_path: Path) -> None:
    """Several requests at once, a leg failing in the middle: each gets its own answer."""
    r = Rig(make_legs(tmp_path))
    try:
        r.mirror.set_fault(1, FaultSpec(error_ppm=500_000, seed=7))
        for round_ in range(20):
            for tag in range(DEPTH):
                off = (round_ * DEPTH + tag) * 8192 % SIZE
                r.q.buffer(tag)[:8192] = payload(round_, off, 8192)
                r.q.inject(tag, Op.WRITE, off // 512, 16)
            got: list[tuple[int, int]] = []
            while len(got) < DEPTH:
                got += r.q.harvest(r.batch)
            assert sorted(got) == [(t, 8192) for t in range(DEPTH)]
        assert state(r, 1) == "failed"
        r.mirror.set_fault(1, None)
        r.mirror.promote(1)
    finally:
        r.close()
    assert leg_bytes(r.mirror.legs[0]) == leg_bytes(r.mirror.legs[1])


# ---- resync against a concurrent writer ---------------------------------------------


@pytest.mark.parametrize("promote_while_writing", [False, True])
def test_resync_races_a_writer(tmp_path: Path, promote_while_writing: bool) -> None:
    """A writer thread hammers a few regions while leg 1 is failed, resynced and
    promoted; afterwards both legs hold exactly every acknowledged write."""
    legs = make_legs(tmp_path)
    mirror = MirrorTarget(legs, region_size=REGION)
    ct = mirror.attach()
    model = bytearray(SIZE)
    stop = threading.Event()
    failed = threading.Event()
    errors: list[BaseException] = []
    writes = [0]

    def writer() -> None:
        try:
            # The queue belongs to this thread (single-issuer ring).
            q = _bindings.Queue(ct, -1, 0, DEPTH, BUF, True, default_ring_flags())
            batch = _bindings.EventBatch(DEPTH)
            rnd = np.random.default_rng(1)
            try:
                n = 0
                while not stop.is_set():
                    off = int(rnd.integers(0, 4 * REGION // 4096)) * 4096  # 4 busy regions
                    length = int(rnd.integers(1, 8)) * 4096
                    data = rnd.integers(0, 256, length, dtype=np.uint8).tobytes()
                    q.buffer(0)[:length] = data
                    q.inject(0, Op.WRITE, off // 512, length // 512)
                    assert q.harvest(batch) == [(0, length)]
                    model[off:off + length] = data
                    n += 1
                    if n == 50:
                        failed.wait(10)
                writes[0] = n
            finally:
                q.free()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        mirror.set_leg_state(1, "failed")
        failed.set()
        time.sleep(0.3)
        assert mirror.leg_info()[1].dirty_regions >= 1
        if promote_while_writing:
            mirror.promote(1, timeout=60, batch=1)
            assert mirror.leg_info()[1].state == "active"
            time.sleep(0.3)
            stop.set()
        else:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                mirror.resync(1, 1)
            stop.set()
        t.join(30)
        assert not errors, errors
        mirror.promote(1, timeout=60)
    finally:
        stop.set()
        t.join(30)
        ct.free()
        mirror.close()
    assert writes[0] > 100
    for path in legs:
        assert leg_bytes(path) == bytes(model)
