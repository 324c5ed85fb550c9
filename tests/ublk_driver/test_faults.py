"""Fault injection: the spec (parse, JSON, engine struct) and the engine's schedules.

Engine tests run harness queues (real io_uring, real timers, no kernel
driver) of the null, mem and loop targets; mirror legs are in
tests/ublk_driver/targets/test_mirror.py.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from examples.ramdisk import RamDisk
from ublk_driver import _bindings
from ublk_driver.core.errors import ConfigError
from ublk_driver.faults import OPS, FaultSpec
from ublk_driver.queue import default_ring_flags
from ublk_driver.records import COMPLETION_DTYPE
from ublk_driver.targets import LoopTarget, MemTarget, NullTarget, PluginBackend
from ublk_driver.targets.base import Backend
from ublk_driver.uapi import Op

# ---- the spec ---------------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> FaultSpec:
    mode = draw(st.sampled_from(["const", "burst", "ramp"]))
    kw: dict[str, object] = {"mode": mode}
    if mode == "burst":
        period = draw(st.integers(1, 10**7))
        kw["burst_period_ms"] = period
        kw["burst_on_ms"] = draw(st.integers(1, period))
    elif mode == "ramp":
        kw["ramp_ms"] = draw(st.integers(1, 10**7))
    return FaultSpec(
        delay_us=draw(st.integers(0, 2**32 - 1)),
        slow=draw(st.integers(1000, 1_000_000)) / 1000,
        error_ppm=draw(st.integers(0, 1_000_000)),
        ops=tuple(draw(st.sets(st.sampled_from(OPS), min_size=1))),
        errno=draw(st.sampled_from([errno.EIO, errno.ENOSPC, errno.ETIMEDOUT, 300])),
        seed=draw(st.integers(0, 2**64 - 1)),
        **kw,  # type: ignore[arg-type]
    )


@given(specs())
def test_spec_round_trips(spec: FaultSpec) -> None:
    assert FaultSpec.parse(str(spec)) == spec
    assert FaultSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert FaultSpec.from_c(spec.to_c()) == spec


def test_parse_the_documented_example() -> None:
    s = FaultSpec.parse("delay=2ms,slow=10,burst=1s/200ms,errors=0.01,ops=read+write,"
                        "errno=EIO,seed=1")
    assert s == FaultSpec(delay_us=2000, slow=10.0, mode="burst", burst_period_ms=1000,
                          burst_on_ms=200, error_ppm=10_000, ops=("read", "write"),
                          errno=errno.EIO, seed=1)
    assert s.to_c()["err_ops"] == (1 << Op.READ) | (1 << Op.WRITE)
    assert FaultSpec.parse("ramp=30s,slow=10x").ramp_ms == 30_000
    assert FaultSpec.parse("errors=1%,ops=all,errno=ENOSPC").error_ppm == 10_000
    assert FaultSpec.parse("errors=50ppm,ops=write-zeroes").ops == ("write_zeroes",)


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty fault spec"),
    ("delay", "expected KEY=VALUE"),
    ("delay=5", "give a duration with a unit"),
    ("delay=-1ms", "give a duration with a unit"),
    ("slow=fast", "give a factor"),
    ("slow=0.5", "slow must be a factor from 1"),
    ("burst=1s", "give PERIOD/ON"),
    ("burst=100ms/1s", "0 < ON <= PERIOD"),
    ("burst=1s/200ms,ramp=1s", "one schedule"),
    ("ramp=1500us", "millisecond resolution"),
    ("errors=2", "probability per I/O from 0 to 1"),
    ("errors=1e-9", "below one per million"),
    ("ops=read+fsync", "unknown operation"),
    ("errno=EWHAT", "errno name"),
    ("seed=abc", "give an integer"),
    ("delay=1ms,delay=2ms", "twice"),
    ("color=red", "unknown fault setting 'color'"),
])
def test_parse_errors_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        FaultSpec.parse(text)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_fields_and_bad_types() -> None:
    with pytest.raises(ConfigError, match="unknown fault field"):
        FaultSpec.from_dict({"delay": 5})
    with pytest.raises(ConfigError, match="must be an integer"):
        FaultSpec.from_dict({"delay_us": "5ms"})
    with pytest.raises(ConfigError, match="list of names"):
        FaultSpec.from_dict({"ops": "read"})


# ---- the engine -------------------------------------------------------------------

DEPTH = 4
BUF = 64 << 10


class Harness:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ct = backend.attach()
        self.q = _bindings.Queue(self.ct, -1, 0, DEPTH, BUF, True, default_ring_flags())
        self.q.enable_records(1 << 16)
        self.batch = _bindings.EventBatch(DEPTH)

    def io(self, op: int, sector: int = 0, n: int = 8) -> int:
        self.q.inject(0, op, sector, n if op != Op.FLUSH else 0)
        res = self.q.harvest(self.batch)
        assert len(res) == 1
        return res[0][1]

    def results(self, count: int, op: int = Op.READ) -> list[int]:
        return [self.io(op, (i * 8) % 2048) for i in range(count)]

    def records(self) -> np.ndarray:
        buf = np.empty(1 << 16, dtype=COMPLETION_DTYPE)
        return buf[:self.q.read_records(buf)]

    def close(self) -> None:
        self.q.free()
        self.ct.free()
        self.backend.close()


@pytest.fixture(params=["null", "mem", "loop"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    backend: Backend
    if request.param == "null":
        backend = NullTarget(1 << 20)
    elif request.param == "mem":
        backend = MemTarget(1 << 20)
    else:
        p = tmp_path / "backing.img"
        p.write_bytes(bytes(1 << 20))
        backend = LoopTarget(str(p))
    h = Harness(backend)
    request.addfinalizer(h.close)
    return h


def test_delay_is_applied_without_sleeping_the_thread(harness: Harness) -> None:
    harness.backend.set_fault(0, FaultSpec(delay_us=20_000))
    t0 = time.monotonic()
    # DEPTH requests at once: with timers they overlap, with sleeps they would add up.
    for tag in range(DEPTH):
        harness.q.inject(tag, Op.READ, tag * 8, 8)
    done: list[tuple[int, int]] = []
    while len(done) < DEPTH:
        done += harness.q.harvest(harness.batch)
    elapsed = time.monotonic() - t0
    assert sorted(done) == [(t, 4096) for t in range(DEPTH)]
    assert 0.019 <= elapsed < 0.019 * DEPTH
    assert harness.records()["lat_ns"].min() >= 20_000_000
    harness.backend.set_fault(0, None)
    t0 = time.monotonic()
    harness.io(Op.READ)
    assert time.monotonic() - t0 < 0.015


def test_slowdown_multiplies_the_measured_service_time(tmp_path: Path) -> None:
    p = tmp_path / "backing.img"
    p.write_bytes(bytes(8 << 20))
    h = Harness(LoopTarget(str(p)))
    try:
        # 64 KiB reads and writes of a file: a service time that is measurable.
        def median_lat(n: int) -> float:
            h.records()
            for i in range(n):
                h.io(Op.WRITE, i * 128, 128)
                h.io(Op.READ, i * 128, 128)
            return float(np.median(h.records()["lat_ns"]))

        base = median_lat(30)
        h.backend.set_fault(0, FaultSpec(slow=10))
        slow = median_lat(30)
        assert slow > 5 * base, (base, slow)
        h.backend.set_fault(0, None)
        assert median_lat(30) < slow / 3
    finally:
        h.close()


def test_error_rate_is_seeded_deterministic_and_close_to_its_rate() -> None:
    def run(seed: int) -> list[int]:
        h = Harness(NullTarget(1 << 20))
        try:
            h.backend.set_fault(0, FaultSpec(error_ppm=100_000, seed=seed,
                                             errno=errno.ETIMEDOUT))
            return h.results(20_000)
        finally:
            h.close()

    a, b, c = run(1), run(1), run(2)
    assert a == b                         # same seed, same I/O sequence: same errors
    assert a != c
    failed = sum(r < 0 for r in a)
    assert 1800 <= failed <= 2200         # 10 % of 20000, within 5 sigma
    assert set(a) == {4096, -errno.ETIMEDOUT}


def test_ops_mask_is_honoured(harness: Harness) -> None:
    harness.backend.set_fault(0, FaultSpec(error_ppm=1_000_000, ops=("write",),
                                           errno=errno.ENOSPC))
    assert harness.results(20, Op.READ) == [4096] * 20
    assert harness.results(20, Op.WRITE) == [-errno.ENOSPC] * 20
    assert harness.io(Op.FLUSH) == 0
    assert harness.q.stats().errors == 20


def test_burst_schedule_switches_on_and_off() -> None:
    h = Harness(NullTarget(1 << 20))
    try:
        h.backend.set_fault(0, FaultSpec(error_ppm=1_000_000, mode="burst",
                                         burst_period_ms=200, burst_on_ms=100))
        seen = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:
            phase = ((time.monotonic() - t0) * 1000) % 200
            res = h.io(Op.READ)
            if 10 < phase < 90 or 110 < phase < 190:   # away from the edges
                seen.append((phase < 100, res < 0))
            time.sleep(0.002)
        on = [failed for in_burst, failed in seen if in_burst]
        off = [failed for in_burst, failed in seen if not in_burst]
        assert on and off and all(on) and not any(off)
    finally:
        h.close()


def test_ramp_grows_from_nothing_to_the_full_rate() -> None:
    h = Harness(NullTarget(1 << 20))
    try:
        h.backend.set_fault(0, FaultSpec(error_ppm=1_000_000, mode="ramp", ramp_ms=400))
        early = sum(r < 0 for r in h.results(200))
        time.sleep(0.45)
        late = sum(r < 0 for r in h.results(200))
        assert early < 100 and late == 200
    finally:
        h.close()


def test_faults_set_before_start_apply_at_attach_and_are_listed() -> None:
    backend = NullTarget(1 << 20)
    spec = FaultSpec(error_ppm=1_000_000)
    backend.set_fault(0, spec)
    h = Harness(backend)
    try:
        assert h.io(Op.READ) == -errno.EIO
        assert backend.faults() == {0: spec}
        assert FaultSpec.from_c(h.ct.get_fault(0) or {}) == spec
        backend.set_fault(0, None)
        assert backend.faults() == {} and h.ct.get_fault(0) is None
        assert h.io(Op.READ) == 4096
    finally:
        h.close()


def test_faults_change_while_the_queue_serves() -> None:
    """A control thread flips faults as fast as it can: the queue never stalls."""
    h = Harness(NullTarget(1 << 20))
    stop = threading.Event()

    def flipper() -> None:
        on = FaultSpec(error_ppm=1_000_000)
        while not stop.is_set():
            h.backend.set_fault(0, on)
            h.backend.set_fault(0, None)

    t = threading.Thread(target=flipper)
    t.start()
    try:
        results = h.results(20_000)
    finally:
        stop.set()
        t.join()
        h.close()
    assert set(results) <= {4096, -errno.EIO}


def test_targets_without_paths_refuse_faults() -> None:
    backend = PluginBackend(RamDisk("1M"))
    with pytest.raises(ConfigError, match="no fault injection"):
        backend.set_fault(0, FaultSpec(delay_us=1))
    with pytest.raises(ConfigError, match="path 1 does not exist"):
        NullTarget(1 << 20).set_fault(1, FaultSpec(delay_us=1))
