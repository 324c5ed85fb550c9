"""Features: histogram quantiles vs exact ones, mergeable summaries, peers, telemetry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ml import features as F
from tests.ml.helpers import batch
from ublk_driver.records import COMPLETION_DTYPE
from ublk_driver.uapi import Op


def col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, F.FEATURE_INDEX[name]]


def test_registry_is_ordered_and_documented() -> None:
    assert F.FEATURE_NAMES[:4] == ("lat_p50_us", "lat_p90_us", "lat_p99_us", "lat_mean_us")
    assert len(set(F.FEATURE_NAMES)) == len(F.FEATURE_NAMES)
    assert all(F.FEATURES[n] for n in F.FEATURE_NAMES)
    assert set(F.IO_FEATURES).isdisjoint(F.SMART_FEATURES)


def test_record_features_match_exact_statistics() -> None:
    r = batch(50_000, paths=3, slow_path=2, factor=3.0)
    r["result"][:50] = -5                      # errors, all on whatever paths they fall on
    r["op"][100:200] = Op.FLUSH                # moves no bytes
    r["length"][100:200] = 0
    r["result"][100:200] = 0
    duration = 0.5
    paths, x = F.record_features(r, duration_s=duration)
    assert list(paths) == [0, 1, 2]
    for i, p in enumerate(paths):
        mine = r[r["path"] == p]
        lat_us = mine["lat_ns"] / 1e3
        exact = np.quantile(lat_us, [0.5, 0.9, 0.99])
        got = x[i, [F.FEATURE_INDEX[n] for n in ("lat_p50_us", "lat_p90_us", "lat_p99_us")]]
        np.testing.assert_allclose(got, exact, rtol=0.04)  # histogram: 16 bins per octave
        assert col(x, "lat_mean_us")[i] == pytest.approx(lat_us.mean())
        assert col(x, "iops")[i] == pytest.approx(len(mine) / duration)
        moved = mine["result"][(mine["result"] > 0) & (mine["op"] <= 1)].sum()
        assert col(x, "throughput_bps")[i] == pytest.approx(moved / duration)
        assert col(x, "error_rate")[i] == pytest.approx(np.mean(mine["result"] < 0))
        assert col(x, "queue_depth")[i] == pytest.approx(len(mine) / duration
                                                         * lat_us.mean() / 1e6)
        assert col(x, "lat_cv")[i] == pytest.approx(lat_us.std() / lat_us.mean(), rel=1e-6)
        assert col(x, "samples")[i] == len(mine)
    ratio = col(x, "peer_lat_ratio")
    assert ratio[2] == pytest.approx(3.0, rel=0.1)   # the slow leg vs the median of the others
    assert ratio[0] < 0.6 and ratio[1] < 0.6         # healthy legs vs median(healthy, slow)


def test_single_path_has_neutral_peer_ratios() -> None:
    _, x = F.record_features(batch(1000))
    for n in ("peer_lat_ratio", "peer_p90_ratio", "peer_p99_ratio", "peer_tput_ratio"):
        assert col(x, n)[0] == 1.0


def test_empty_batch_and_min_samples() -> None:
    paths, x = F.record_features(np.zeros(0, dtype=COMPLETION_DTYPE))
    assert paths.size == 0 and x.shape == (0, len(F.FEATURE_NAMES))
    paths, _ = F.record_features(batch(10), min_samples=11)
    assert paths.size == 0


def test_wrong_dtype_is_refused() -> None:
    with pytest.raises(F.FeatureError, match="COMPLETION_DTYPE"):
        F.summarize(np.zeros(3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(-5, 8192)),
                min_size=0, max_size=200), st.integers(0, 200))
def test_summaries_add_and_subtract(rows: list[tuple[int, int, int]], cut: int) -> None:
    r = np.zeros(len(rows), dtype=COMPLETION_DTYPE)
    if rows:
        r["path"], r["lat_ns"], r["result"] = (np.array(c) for c in zip(*rows, strict=True))
    a, b = r[:cut], r[cut:]
    total = F.summarize(r)
    s = F.summarize(a)
    s.add(F.summarize(b))
    for name in ("n", "errors", "bytes", "hist"):
        np.testing.assert_array_equal(getattr(s, name), getattr(total, name)[: s.n_paths]
                                      if total.n_paths else getattr(s, name))
    s.subtract(F.summarize(b))
    np.testing.assert_array_equal(s.hist[: F.summarize(a).n_paths], F.summarize(a).hist)
    assert int(s.n.sum()) == len(a)


@given(st.integers(0, 2**32 - 1))
def test_latency_bin_midpoint_is_close(v: int) -> None:
    b = F.latency_bins(np.array([v], dtype=np.uint32))[0]
    assert 0 <= b < F.N_BINS
    if v >= 16:
        assert abs(F._BIN_MID[b] - v) / v <= 1 / 32 + 1e-9


def test_peer_median_ignores_nan_and_self() -> None:
    v = np.array([[1.0, np.nan], [2.0, 5.0], [10.0, np.nan]])
    med = F.peer_median(v)
    np.testing.assert_allclose(med[:, 0], [6.0, 5.5, 1.5])
    assert med[1, 1] != med[1, 1]  # no valid peer: NaN
    assert med[0, 1] == 5.0
    r = F.peer_ratio(v)
    assert r[1, 1] == 1.0          # no peers: neutral
    assert np.isnan(r[0, 1])       # no value: stays missing


def test_telemetry_features_exact_quantiles_and_peers() -> None:
    rng = np.random.default_rng(1)
    ts = np.repeat(np.arange(0, 7200, 60.0), 4)
    d = np.tile(np.arange(4), 120)
    lat = rng.lognormal(0, 0.2, ts.size) * np.where(d == 3, 2.5, 1.0)
    tput = rng.uniform(1, 2, ts.size)
    tw = F.telemetry_features(ts, d, lat, tput, window_s=1800)
    assert tw.x.shape == (16, len(F.FEATURE_NAMES))
    for i in range(16):
        sel = (d == tw.drive[i]) & ((ts // 1800) == tw.window[i])
        assert col(tw.x, "lat_p90_us")[i] == pytest.approx(np.quantile(lat[sel], 0.9))
        assert col(tw.x, "throughput_bps")[i] == pytest.approx(tput[sel].mean())
    slow = col(tw.x, "peer_lat_ratio")[tw.drive == 3]
    healthy = col(tw.x, "peer_lat_ratio")[tw.drive != 3]
    assert slow.min() > 2.0 and healthy.max() < 1.3
    assert np.all(np.isnan(col(tw.x, "iops")))  # telemetry has no IOPS


def test_select_orders_columns_and_refuses_unknown() -> None:
    x = np.arange(len(F.FEATURE_NAMES), dtype=float)[None, :]
    out = F.select(x, ["peer_tput_ratio", "lat_p50_us"])
    assert out.dtype == np.float32
    assert list(out[0]) == [F.FEATURE_INDEX["peer_tput_ratio"], 0]
    with pytest.raises(F.FeatureError, match="nope"):
        F.select(x, ["nope"])


# ---- latency against throughput: the fit_* features ----------------------------------


def _host(rng: np.random.Generator, n_drives: int, n: int, slope: float, icept: float,
          slow: dict[int, float], t_scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """Samples of one host whose drives all follow latency = icept + slope * tput
    (noise-free), drive d slowed by slow[d]; 15-s rows."""
    ts = np.repeat(np.arange(n) * 15.0, n_drives)
    d = np.tile(np.arange(n_drives), n)
    tput = rng.uniform(1, 100, ts.size) * t_scale
    lat = (icept + slope * tput / t_scale) * np.array([slow.get(int(i), 1.0) for i in d])
    return ts, d, lat, tput


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 12), st.floats(0.5, 5), st.floats(0.01, 10), st.floats(1, 1000),
       st.integers(0, 2**32 - 1), st.sampled_from([1e-3, 1.0, 1e6]))
def test_fit_ratio_is_the_slowdown_against_peers(n_drives: int, k: float, slope: float,
                                                 icept: float, seed: int,
                                                 t_scale: float) -> None:
    """A drive k times slower than its peers at the same throughput has fit ratios of
    k in every window, whatever the throughput unit; its peers (the drive itself
    excluded from each one's reference) have 1 - with 4 or more drives, where every
    healthy drive has at least two healthy peers, so the slow one is not their median
    (with 3, a healthy drive's two peers' median is the mean of the slow and the
    healthy curve)."""
    rng = np.random.default_rng(seed)
    ts, d, lat, tput = _host(rng, n_drives, 240, slope, icept, {0: k}, t_scale)
    tw = F.telemetry_features(ts, d, lat, tput, window_s=1800)
    fit = tw.x[:, [F.FEATURE_INDEX[n] for n in F.FIT_FEATURES]]
    # the peers' curve is exact inside their throughput range, flat beyond it
    inside = tw.drive == 0
    np.testing.assert_allclose(fit[inside, 1], k, rtol=0.05)
    if n_drives >= 4:
        np.testing.assert_allclose(fit[~inside, 1], 1.0, rtol=0.05)
    # unit-free: the same host in other units gives the same features
    tw2 = F.telemetry_features(ts, d, lat * 1e3, tput * 8, window_s=1800)
    np.testing.assert_allclose(tw2.x[:, [F.FEATURE_INDEX[n] for n in F.FIT_FEATURES]], fit,
                               rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 5), st.integers(0, 2**32 - 1), st.sampled_from([1.0, 15.0]))
def test_self_baseline_judges_a_lone_drive(k: float, seed: int, interval: float) -> None:
    """A drive without peers: NaN fit features, unless it has a baseline from its
    healthy past, against which a k-times slowdown reads k, at any sampling interval."""
    rng = np.random.default_rng(seed)
    n = 600
    tput = rng.uniform(10, 500, n)
    healthy = 50 + 0.2 * tput
    base = F.fit_baseline(tput, healthy)
    assert np.all(np.diff(base.throughput) >= 0)
    ts = np.arange(n) * interval
    d = np.zeros(n, dtype=np.int64)
    later = rng.uniform(10, 500, n)
    lone = F.telemetry_features(ts, d, k * (50 + 0.2 * later), later, window_s=60 * interval)
    assert np.all(np.isnan(lone.x[:, F.FEATURE_INDEX["fit_lat_ratio_p50"]]))
    judged = F.telemetry_features(ts, d, k * (50 + 0.2 * later), later,
                                  window_s=60 * interval, baselines={0: base})
    p50 = judged.x[:, F.FEATURE_INDEX["fit_lat_ratio_p50"]]
    np.testing.assert_allclose(p50, k, rtol=0.03)
    assert np.all(judged.x[:, F.FEATURE_INDEX["fit_lat_ratio_p10"]] <= p50 + 1e-12)
    assert np.all(judged.x[:, F.FEATURE_INDEX["fit_lat_ratio_p90"]] >= p50 - 1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e9), st.floats(0, 1e6)), min_size=1, max_size=200))
@example([(0.0, 0.0), (0.0, 1.0), (0.0, 2.2250738585e-313)])  # a subnormal reference: overflow
def test_fit_curve_is_monotone_in_throughput_and_within_the_data(
        pts: list[tuple[float, float]]) -> None:
    t, y = (np.array(c) for c in zip(*pts, strict=True))
    c = F.fit_curve(t, y)
    assert 1 <= c.throughput.size <= 2 * F.MAX_FIT_BINS
    assert np.all(np.diff(c.throughput) >= 0)
    assert c.latency.min() >= y.min() and c.latency.max() <= y.max()
    r = F.fit_ratio_quantiles(t, y, c)
    assert np.all((r >= 0) & (r <= F.RATIO_CAP)) and r[0] <= r[1] <= r[2]


def test_fit_baseline_needs_a_sample() -> None:
    with pytest.raises(F.FeatureError, match="at least one sample"):
        F.fit_baseline(np.array([np.nan]), np.array([1.0]))


def test_fit_features_are_appended_and_not_in_records() -> None:
    assert F.FEATURE_NAMES[-3:] == F.FIT_FEATURES == (
        "fit_lat_ratio_p10", "fit_lat_ratio_p50", "fit_lat_ratio_p90")
    assert F.FEATURE_NAMES.index("smart_198_raw") < F.FEATURE_NAMES.index("fit_lat_ratio_p10")
    assert set(F.FIT_FEATURES) <= set(F.IO_FEATURES)
    _, x = F.record_features(batch(1000, paths=2))
    assert np.all(np.isnan(x[:, [F.FEATURE_INDEX[n] for n in F.FIT_FEATURES]]))
