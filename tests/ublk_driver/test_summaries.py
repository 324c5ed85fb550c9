"""Per-path summaries counted by the queue thread (``ServerConfig.summaries``).

Harness queue (no kernel driver): the C target, ring and counters are the
real ones.  The reference is the Python path the scorer used before, and
still uses without summaries: records folded by ``ml.features.summarize``.
Both are filled by the same I/Os, so they must agree field by field.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.features import summarize, summary_from_counts
from ublk_driver import _bindings
from ublk_driver.faults import FaultSpec
from ublk_driver.queue import default_ring_flags
from ublk_driver.records import COMPLETION_DTYPE, SUMMARY_DTYPE
from ublk_driver.targets import MemTarget
from ublk_driver.uapi import Op


def test_dtype_mirrors_the_c_struct() -> None:
    assert SUMMARY_DTYPE.itemsize == _bindings.sizeof("struct ublkml_path_summary")
    for name in SUMMARY_DTYPE.names or ():
        assert SUMMARY_DTYPE.fields is not None
        assert SUMMARY_DTYPE.fields[name][1] == _bindings.offsetof(
            "struct ublkml_path_summary", name), name


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from([Op.READ, Op.WRITE, Op.FLUSH, Op.DISCARD]),
                              st.integers(0, 300), st.integers(0, 16)),
                    min_size=1, max_size=40),
       delay_us=st.sampled_from([0, 50, 700, 3000]))
def test_summaries_equal_the_records_folded(ops: list[tuple[int, int, int]],
                                            delay_us: int) -> None:
    backend = MemTarget(1 << 20)  # I/O past 1 MiB fails: errors are counted too
    ct = backend.attach()
    q = _bindings.Queue(ct, -1, 0, 4, 65536, True, default_ring_flags())
    try:
        q.enable_records(1024)
        q.enable_summaries()
        if delay_us:
            backend.set_fault(0, FaultSpec(delay_us=delay_us))
        batch = _bindings.EventBatch(4)
        for op, sector, n in ops:
            q.inject(0, op, sector * 8, n * 8)
            while not q.harvest(batch):
                pass
        recs = np.zeros(1024, dtype=COMPLETION_DTYPE)
        recs = recs[:q.read_records(recs)]
        counts = np.zeros(_bindings.MAX_LEGS, dtype=SUMMARY_DTYPE)
        assert q.read_summaries(counts) == _bindings.MAX_LEGS
    finally:
        q.free()
        ct.free()
    assert recs.shape[0] == len(ops)
    want, got = summarize(recs), summary_from_counts(counts)
    assert got.n_paths == want.n_paths == 1
    for name in ("n", "errors", "bytes", "hist"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert np.allclose(got.lat_sum, want.lat_sum) and np.allclose(got.lat_sumsq, want.lat_sumsq)
    if delay_us and want.errors.sum() < want.n.sum():  # errors are answered at once
        assert got.hist[:, 1:].sum() > 0  # the delays were seen: equal bins, not zeros


def test_reading_without_summaries_is_an_error() -> None:
    ct = MemTarget(1 << 20).attach()
    q = _bindings.Queue(ct, -1, 0, 4, 65536, True, default_ring_flags())
    try:
        counts = np.zeros(_bindings.MAX_LEGS, dtype=SUMMARY_DTYPE)
        try:
            q.read_summaries(counts)
        except OSError:
            pass
        else:
            raise AssertionError("read_summaries worked without enable_summaries")
    finally:
        q.free()
        ct.free()
