"""Features of an I/O path over a window, computed with numpy in bulk.

One registry, :data:`FEATURES`, names every feature a model may ask for, in a
fixed order (:data:`FEATURE_NAMES`); a model declares the ordered subset it
reads (see :mod:`ml.model`) and :func:`select` builds its input from a full
feature matrix.  Two sources feed the same registry:

* completion records (:data:`ublk_driver.records.COMPLETION_DTYPE`) from a live
  device, via mergeable per-path summaries (:class:`Summary`): counts, sums
  and a log-linear latency histogram.  Summaries add and subtract, so a
  sliding window is a running sum of per-tick summaries and costs O(1) per
  completion however long the window is;
* drive telemetry rows (``ts, disk_id, throughput, latency``: the layout of
  Alibaba's Perseus data set) via :func:`telemetry_features`, one row per
  drive and fixed time window, with exact quantiles.

Peers: the paths of one device (mirror legs) or the drives of one host.  The
``peer_*`` features divide a path's value by the median of its peers' values
(the path itself excluded), so they are unit-free and carry over from
telemetry in milliseconds to records in nanoseconds; they are 1.0 for a path
without peers.  Features a source cannot provide are NaN (telemetry has no
IOPS, queue depth or errors); :func:`select` refuses a model that needs them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ublk_driver.core.errors import UblkError
from ublk_driver.records import COMPLETION_DTYPE

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: name -> meaning, in the order of the feature matrix columns.  Changing an
#: existing entry breaks every model that declares it: only append.
FEATURES: dict[str, str] = {
    "lat_p50_us": "median latency in the window, microseconds (telemetry: of the "
                  "per-interval latencies, in the file's unit)",
    "lat_p90_us": "90th percentile latency, as lat_p50_us",
    "lat_p99_us": "99th percentile latency, as lat_p50_us",
    "lat_mean_us": "mean latency, as lat_p50_us",
    "throughput_bps": "bytes per second moved by successful reads and writes "
                      "(telemetry: mean of the throughput column, in the file's unit)",
    "iops": "completions per second (records only)",
    "queue_depth": "mean number of requests in flight, by Little's law: iops x mean "
                   "latency (records only)",
    "error_rate": "fraction of completions that failed (result < 0) (records only)",
    "lat_cv": "coefficient of variation (std / mean) of the window's latency samples "
              "(per I/O for records, per interval for telemetry: not comparable)",
    "peer_lat_ratio": "lat_p50 over the median lat_p50 of the peer paths (same device "
                      "or same host), 1.0 without peers",
    "peer_p90_ratio": "lat_p90 over the peers' median lat_p90, 1.0 without peers",
    "peer_p99_ratio": "lat_p99 over the peers' median lat_p99, 1.0 without peers",
    "peer_tput_ratio": "throughput over the peers' median throughput, 1.0 without peers",
    "samples": "number of completions (records) or telemetry rows in the window",
    # SMART attributes (raw values), for failure predictors; see ml.smart.
    "smart_5_raw": "SMART 5: reallocated sectors count",
    "smart_9_raw": "SMART 9: power-on hours",
    "smart_187_raw": "SMART 187: reported uncorrectable errors",
    "smart_188_raw": "SMART 188: command timeouts",
    "smart_194_raw": "SMART 194: temperature, Celsius",
    "smart_197_raw": "SMART 197: current pending sectors",
    "smart_198_raw": "SMART 198: offline uncorrectable sectors",
    # Latency against a latency-vs-throughput reference curve (see fit_curve):
    # the peers' curve of the same window, or the drive's own healthy baseline.
    "fit_lat_ratio_p10": "10th percentile, over the window's samples, of latency / the "
                         "reference latency at the sample's throughput; reference: a robust "
                         "curve fitted to the peers' samples of the window (the drive "
                         "excluded), or the drive's own baseline (fit_baseline); NaN without "
                         "either (telemetry only)",
    "fit_lat_ratio_p50": "median of the same per-sample ratio, as fit_lat_ratio_p10",
    "fit_lat_ratio_p90": "90th percentile of the same per-sample ratio, as fit_lat_ratio_p10",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
#: features read from a drive's SMART attributes (ml.smart, Backblaze CSVs)
SMART_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n.startswith("smart_"))
#: features computed from I/O (records or telemetry) by this module
IO_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n not in SMART_FEATURES)
#: the latency-vs-throughput fit features (per-sample throughput needed)
FIT_FEATURES: tuple[str, ...] = tuple(n for n in FEATURE_NAMES if n.startswith("fit_"))
#: the I/O features drive telemetry cannot provide (NaN in telemetry_features)
NOT_IN_TELEMETRY: frozenset[str] = frozenset({"iops", "queue_depth", "error_rate"})
#: the I/O features completion-record summaries cannot provide (NaN in summary_features):
#: a summary keeps no per-interval throughput to fit latency against
NOT_IN_RECORDS: frozenset[str] = frozenset(FIT_FEATURES)
#: ratios are clipped to this, so that an idle peer cannot make them infinite
RATIO_CAP = 100.0

_QS = np.array([0.5, 0.9, 0.99])


class FeatureError(UblkError, ValueError):
    """Features cannot be computed from this input (or a model needs missing ones)."""


# ---- the latency histogram --------------------------------------------------

#: 16 linear sub-bins per power of two: a bin's midpoint is within 1/32 (3 %)
#: of any value in it, enough for quantiles that feed a classifier.
SUB_BITS = 4
SUB_BINS = 1 << SUB_BITS
N_BINS = 32 * SUB_BINS  # lat_ns is a uint32: 2^32 ns = 4.3 s at most
_BIN_MID = np.array([(2.0 ** (b // SUB_BINS)) * (1 + ((b % SUB_BINS) + 0.5) / SUB_BINS)
                     for b in range(N_BINS)])


def latency_bins(lat_ns: npt.NDArray[np.uint32]) -> IntArray:
    """Histogram bin of each latency: 16 linear bins per octave (log-linear)."""
    # frexp gives lat = m * 2**e with m in [0.5, 1): the octave is e - 1 and
    # the sub-bin is the top bits of the mantissa, without a log per value.
    m, e = np.frexp(lat_ns.astype(np.float64))
    b = (e.astype(np.int64) - 1) * SUB_BINS + (m * (2 * SUB_BINS)).astype(np.int64) - SUB_BINS
    np.maximum(b, 0, out=b)  # lat 0 gives m = 0, e = 0
    return b


@dataclass
class Summary:
    """Mergeable per-path statistics of a set of completion records.

    Row ``p`` of every array is path ``p``; the arrays grow to the largest
    path seen.  ``a.add(b)`` and ``a.subtract(b)`` make sliding windows cheap.
    """

    n: IntArray            # completions
    errors: IntArray       # completions with result < 0
    bytes: IntArray        # bytes moved by successful reads and writes
    lat_sum: FloatArray    # ns
    lat_sumsq: FloatArray  # ns^2
    hist: IntArray         # [paths, N_BINS] latency histogram

    @classmethod
    def empty(cls, n_paths: int = 0) -> Summary:
        z = np.zeros(n_paths, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), np.zeros(n_paths), np.zeros(n_paths),
                   np.zeros((n_paths, N_BINS), dtype=np.int64))

    @property
    def n_paths(self) -> int:
        return int(self.n.shape[0])

    def _grow(self, n_paths: int) -> None:
        extra = n_paths - self.n_paths
        if extra <= 0:
            return
        pad = Summary.empty(extra)
        self.n = np.concatenate([self.n, pad.n])
        self.errors = np.concatenate([self.errors, pad.errors])
        self.bytes = np.concatenate([self.bytes, pad.bytes])
        self.lat_sum = np.concatenate([self.lat_sum, pad.lat_sum])
        self.lat_sumsq = np.concatenate([self.lat_sumsq, pad.lat_sumsq])
        self.hist = np.concatenate([self.hist, pad.hist])

    def add(self, other: Summary, sign: int = 1) -> None:
        """Add (or, with ``sign=-1``, remove) another summary's completions."""
        self._grow(other.n_paths)
        k = other.n_paths
        self.n[:k] += sign * other.n
        self.errors[:k] += sign * other.errors
        self.bytes[:k] += sign * other.bytes
        self.lat_sum[:k] += sign * other.lat_sum
        self.lat_sumsq[:k] += sign * other.lat_sumsq
        self.hist[:k] += sign * other.hist

    def subtract(self, other: Summary) -> None:
        self.add(other, -1)


def summarize(records: npt.NDArray[np.void]) -> Summary:
    """One pass of bincounts over a batch of completion records."""
    if records.dtype != COMPLETION_DTYPE:
        raise FeatureError(f"records must have dtype COMPLETION_DTYPE, got {records.dtype}")
    if records.shape[0] == 0:
        return Summary.empty()
    path = records["path"].astype(np.int64)
    n_paths = int(path.max()) + 1
    lat = records["lat_ns"]
    result = records["result"]
    latf = lat.astype(np.float64)
    data = (records["op"] <= 1) & (result > 0)  # READ = 0, WRITE = 1
    moved = np.where(data, result, 0).astype(np.float64)
    hist = np.bincount(path * N_BINS + latency_bins(lat), minlength=n_paths * N_BINS)
    return Summary(
        n=np.bincount(path, minlength=n_paths).astype(np.int64),
        errors=np.bincount(path, weights=(result < 0), minlength=n_paths).astype(np.int64),
        bytes=np.bincount(path, weights=moved, minlength=n_paths).astype(np.int64),
        lat_sum=np.bincount(path, weights=latf, minlength=n_paths).astype(np.float64),
        lat_sumsq=np.bincount(path, weights=latf * latf,
                               minlength=n_paths).astype(np.float64),
        hist=hist.reshape(n_paths, N_BINS).astype(np.int64),
    )


def summary_from_counts(counts: npt.NDArray[np.void]) -> Summary:
    """A :class:`Summary` from the engine's per-path counts
    (``ublk_driver.records.SUMMARY_DTYPE``: cumulative, or the difference of
    two reads).  Paths after the last one that ever completed are dropped,
    as :func:`summarize` never sees them."""
    hist = counts["hist"].astype(np.int64)
    if hist.shape[1:] != (N_BINS,):
        raise FeatureError(f"summary histograms have {hist.shape[1:]} bins, expected {N_BINS}")
    used = np.flatnonzero(counts["n"])
    k = int(used[-1]) + 1 if used.size else 0
    # n from the histogram: the engine's words are read one by one, so n and
    # the bins may be a few I/Os apart; quantiles need them to agree.
    return Summary(n=hist[:k].sum(axis=1), errors=counts["errors"][:k].astype(np.int64),
                   bytes=counts["bytes"][:k].astype(np.int64),
                   lat_sum=counts["lat_sum"][:k].astype(np.float64),
                   lat_sumsq=counts["lat_sumsq"][:k].astype(np.float64), hist=hist[:k])


def _hist_quantiles(hist: IntArray, n: IntArray) -> FloatArray:
    """[paths, len(_QS)] quantiles (ns) from histograms: the bin holding each rank."""
    cum = np.cumsum(hist, axis=1)
    rank = _QS[None, :] * np.maximum(n - 1, 0)[:, None]           # 0-based
    idx = (cum[:, None, :] > rank[:, :, None]).argmax(axis=2)
    out: FloatArray = _BIN_MID[idx]
    return out


# ---- peers ------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _others(k: int) -> IntArray:
    """[k, k-1]: for each row, the indices of the other rows."""
    return np.array([[j for j in range(k) if j != i] for i in range(k)], dtype=np.int64)


def peer_median(values: FloatArray) -> FloatArray:
    """Median over the *other* rows (axis 0) of ``values``, ignoring NaN.

    ``values`` is [peers, ...]; the result has the same shape and is NaN where
    a row has no valid peer.  Written without np.nanmedian, which warns on
    all-NaN slices (and warnings are errors in the tests).
    """
    k = values.shape[0]
    if k <= 1:
        return np.full(values.shape, np.nan)
    peers = np.sort(values[_others(k)], axis=1)        # [k, k-1, ...], NaN last
    valid = np.sum(~np.isnan(peers), axis=1)           # [k, ...]
    lo = np.take_along_axis(peers, np.maximum((valid - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(peers, np.maximum(valid // 2, 0)[:, None], axis=1)[:, 0]
    med: FloatArray = np.where(valid > 0, (lo + hi) / 2, np.nan)
    return med


def peer_ratio(values: FloatArray) -> FloatArray:
    """values / peer_median(values), 1.0 without peers, clipped to [0, RATIO_CAP]."""
    med = peer_median(values)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # capped below
        r = values / med
    r[np.isnan(med)] = 1.0                                 # no peers
    r[(med == 0) & (values == 0)] = 1.0                    # both idle
    r[(med == 0) & (values > 0)] = RATIO_CAP
    r[np.isnan(values)] = np.nan
    out: FloatArray = np.minimum(r, RATIO_CAP)
    return out


_PEER_OF = {"peer_lat_ratio": "lat_p50_us", "peer_p90_ratio": "lat_p90_us",
            "peer_p99_ratio": "lat_p99_us", "peer_tput_ratio": "throughput_bps"}
_PEER_DST = [FEATURE_INDEX[n] for n in _PEER_OF]
_PEER_SRC = [FEATURE_INDEX[n] for n in _PEER_OF.values()]


def _fill_peer_columns(x: FloatArray) -> None:
    """Peer ratios of x ([peers, windows, features]) in place, in one pass."""
    x[:, :, _PEER_DST] = peer_ratio(x[:, :, _PEER_SRC])


# ---- completion records -----------------------------------------------------


def summary_features(summary: Summary, duration_s: float,
                     min_samples: int = 1) -> tuple[IntArray, FloatArray]:
    """(paths, X): a row of the full feature matrix per path with enough samples.

    Peers are the other paths of the same summary (the device's legs).
    """
    if duration_s <= 0:
        raise FeatureError(f"window duration must be positive, got {duration_s}")
    n = summary.n
    ok = n >= max(min_samples, 1)
    paths = np.flatnonzero(ok).astype(np.int64)
    if paths.size == 0:
        return paths, np.empty((0, len(FEATURE_NAMES)))
    nf = n[ok].astype(np.float64)
    x = np.full((paths.size, len(FEATURE_NAMES)), np.nan)
    q = _hist_quantiles(summary.hist[ok], n[ok]) / 1e3
    mean_ns = summary.lat_sum[ok] / nf
    var = np.maximum(summary.lat_sumsq[ok] / nf - mean_ns * mean_ns, 0.0)
    iops = nf / duration_s
    x[:, FEATURE_INDEX["lat_p50_us"]] = q[:, 0]
    x[:, FEATURE_INDEX["lat_p90_us"]] = q[:, 1]
    x[:, FEATURE_INDEX["lat_p99_us"]] = q[:, 2]
    x[:, FEATURE_INDEX["lat_mean_us"]] = mean_ns / 1e3
    x[:, FEATURE_INDEX["throughput_bps"]] = summary.bytes[ok] / duration_s
    x[:, FEATURE_INDEX["iops"]] = iops
    x[:, FEATURE_INDEX["queue_depth"]] = iops * mean_ns / 1e9
    x[:, FEATURE_INDEX["error_rate"]] = summary.errors[ok] / nf
    with np.errstate(divide="ignore", invalid="ignore"):
        x[:, FEATURE_INDEX["lat_cv"]] = np.where(mean_ns > 0, np.sqrt(var) / mean_ns, 0.0)
    x[:, FEATURE_INDEX["samples"]] = nf
    _fill_peer_columns(x[:, None, :])
    return paths, x


def record_features(records: npt.NDArray[np.void], duration_s: float | None = None,
                    min_samples: int = 1) -> tuple[IntArray, FloatArray]:
    """(paths, X) for one batch of records taken as one window.

    The window's duration defaults to the span of the records' timestamps
    (at least 1 ms, so that a burst does not divide by zero).
    """
    if duration_s is None:
        if records.shape[0] == 0:
            duration_s = 1.0
        else:
            t = records["t_ns"]
            duration_s = max(float(t.max() - t.min()) / 1e9, 1e-3)
    return summary_features(summarize(records), duration_s, min_samples)


# ---- telemetry --------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryWindows:
    """Feature rows of one host: ``x[i]`` is drive ``drive[i]`` in window ``window[i]``."""

    drive: IntArray
    window: IntArray
    x: FloatArray


def _grouped_quantiles(group: IntArray, values: FloatArray, n_groups: int,
                       qs: FloatArray) -> FloatArray:
    """[n_groups, len(qs)] linear-interpolated quantiles per group (NaN if empty)."""
    order = np.lexsort((values, group))
    v = values[order]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = starts[:, None] + qs[None, :] * np.maximum(counts - 1, 0)[:, None]
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, starts[:, None] + np.maximum(counts - 1, 0)[:, None])
    frac = pos - lo
    if v.size == 0:
        return np.full((n_groups, qs.size), np.nan)
    lo = np.minimum(lo, v.size - 1)
    hi = np.minimum(hi, v.size - 1)
    out: FloatArray = v[lo] * (1 - frac) + v[hi] * frac
    out[counts == 0] = np.nan
    return out


def telemetry_features(ts: FloatArray, drive: IntArray, latency: FloatArray,
                       throughput: FloatArray, window_s: float = 1800.0,
                       min_samples: int = 3,
                       baselines: Mapping[int, Baseline] | None = None) -> TelemetryWindows:
    """Feature rows per (drive, window) for the drives of one host (peers).

    ``drive`` holds indices 0..D-1; windows are ``window_s`` long from the
    host's first timestamp.  Samples can come at any interval (15-s telemetry
    rows, 1-s samples of a live drive).  Rows with fewer than ``min_samples``
    samples are dropped; peer ratios only use windows the peer has too.

    The ``fit_*`` features compare each sample's latency with a reference
    latency at the sample's throughput: the curve of the drive's peers in the
    same window, or, for a drive in ``baselines`` (drive index -> its own
    :func:`fit_baseline`), that baseline - so a drive without peers is judged
    against its own healthy past by the same model.  NaN with neither.
    """
    if window_s <= 0:
        raise FeatureError(f"window must be positive, got {window_s}")
    empty = TelemetryWindows(np.empty(0, np.int64), np.empty(0, np.int64),
                             np.empty((0, len(FEATURE_NAMES))))
    if ts.size == 0:
        return empty
    n_drives = int(drive.max()) + 1
    w = ((ts - ts.min()) // window_s).astype(np.int64)
    n_win = int(w.max()) + 1
    g = drive.astype(np.int64) * n_win + w
    n_groups = n_drives * n_win
    counts = np.bincount(g, minlength=n_groups).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(g, weights=latency, minlength=n_groups) / counts
        meansq = np.bincount(g, weights=latency * latency, minlength=n_groups) / counts
        tput = np.bincount(g, weights=throughput, minlength=n_groups) / counts
        cv = np.where(mean > 0, np.sqrt(np.maximum(meansq - mean * mean, 0)) / mean, 0.0)
    q = _grouped_quantiles(g, latency.astype(np.float64), n_groups, _QS)
    x = np.full((n_groups, len(FEATURE_NAMES)), np.nan)
    x[:, FEATURE_INDEX["lat_p50_us"]] = q[:, 0]
    x[:, FEATURE_INDEX["lat_p90_us"]] = q[:, 1]
    x[:, FEATURE_INDEX["lat_p99_us"]] = q[:, 2]
    x[:, FEATURE_INDEX["lat_mean_us"]] = mean
    x[:, FEATURE_INDEX["throughput_bps"]] = tput
    x[:, FEATURE_INDEX["lat_cv"]] = cv
    x[:, FEATURE_INDEX["samples"]] = counts
    keep = counts >= max(min_samples, 1)
    x[~keep, :] = np.nan  # so that peers ignore thin windows
    x3 = x.reshape(n_drives, n_win, len(FEATURE_NAMES))
    _fill_peer_columns(x3)
    _fill_fit_columns(x3, ts, drive.astype(np.int64), w, latency.astype(np.float64),
                      throughput.astype(np.float64), keep, dict(baselines or {}))
    x = x3.reshape(n_groups, len(FEATURE_NAMES))
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return empty
    return TelemetryWindows(drive=(idx // n_win).astype(np.int64),
                            window=(idx % n_win).astype(np.int64), x=x[idx])


# ---- latency against throughput ------------------------------------------------

#: reference curves have at most this many throughput bins ...
MAX_FIT_BINS = 8
#: ... and at least this many samples (per drive) in a bin on average
MIN_BIN_SAMPLES = 4
_FIT_QS = np.array([0.1, 0.5, 0.9])
_FIT_DST = [FEATURE_INDEX[n] for n in FIT_FEATURES]


@dataclass(frozen=True)
class Baseline:
    """A latency-vs-throughput curve: ``latency`` at ``throughput`` (both ascending in
    throughput), linear in between, flat beyond the ends.  Units are those of the
    samples it was fitted to; the ratios it gives are unit-free."""

    throughput: FloatArray
    latency: FloatArray

    def __call__(self, throughput: FloatArray) -> FloatArray:
        out: FloatArray = np.interp(throughput, self.throughput, self.latency)
        return out


def _n_bins(samples_per_drive: float, max_bins: int = MAX_FIT_BINS) -> int:
    return int(np.clip(samples_per_drive // MIN_BIN_SAMPLES, 1, max_bins))


def _bin_of(tput: FloatArray, n_bins: int) -> IntArray:
    """Bins of equal counts by throughput (quantile edges: scale-free)."""
    if n_bins <= 1:
        return np.zeros(tput.size, dtype=np.int64)
    edges = np.quantile(tput, np.linspace(0, 1, n_bins + 1)[1:-1])
    b: IntArray = np.searchsorted(edges, tput, side="right").astype(np.int64)
    return b


def _curve(x: FloatArray, y: FloatArray) -> Baseline | None:
    """The curve through (x, y) points of the bins that have both, sorted by x."""
    ok = ~(np.isnan(x) | np.isnan(y))
    if not ok.any():
        return None
    order = np.argsort(x[ok], kind="stable")
    return Baseline(np.ascontiguousarray(x[ok][order]), np.ascontiguousarray(y[ok][order]))


def fit_curve(throughput: FloatArray, latency: FloatArray,
              max_bins: int = 2 * MAX_FIT_BINS) -> Baseline:
    """A robust latency-vs-throughput curve of one set of samples: the samples in
    up to ``max_bins`` bins of equal counts by throughput, each bin's median
    throughput and median latency (medians: a burst of slow samples does not move
    it), joined linearly."""
    tput = np.asarray(throughput, dtype=np.float64)
    lat = np.asarray(latency, dtype=np.float64)
    ok = np.isfinite(tput) & np.isfinite(lat)
    tput, lat = tput[ok], lat[ok]
    if tput.size == 0:
        raise FeatureError("a baseline needs at least one sample with a finite throughput "
                           "and latency")
    k = _n_bins(tput.size, max_bins)
    b = _bin_of(tput, k)
    q = _grouped_quantiles(b, tput, k, np.array([0.5]))[:, 0]
    m = _grouped_quantiles(b, lat, k, np.array([0.5]))[:, 0]
    curve = _curve(q, m)
    assert curve is not None  # every sample is in some bin
    return curve


def fit_baseline(throughput: FloatArray, latency: FloatArray) -> Baseline:
    """A drive's own latency-vs-throughput curve, learned from samples taken while it
    was healthy (:func:`fit_curve`); :func:`telemetry_features` judges the drive
    against it (``baselines=``) instead of against its peers."""
    return fit_curve(throughput, latency)


def _ratios(lat: FloatArray, ref: FloatArray) -> FloatArray:
    # over: a subnormal reference (1e-313 us) overflows the quotient; capped below.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = lat / ref
    r[(ref <= 0) & (lat <= 0)] = 1.0
    r[(ref <= 0) & (lat > 0)] = RATIO_CAP
    out: FloatArray = np.minimum(r, RATIO_CAP)
    return out


def _peer_curves(drive: IntArray, tput: FloatArray, lat: FloatArray,
                 n_drives: int) -> list[Baseline | None]:
    """For each drive of one window, the curve of its peers: bins by throughput
    over all drives' samples; per drive and bin the median throughput and
    latency; per bin the median of the *other* drives' medians (a peer with
    many samples, or one slow peer, does not drag it)."""
    counts = np.bincount(drive, minlength=n_drives)
    present = counts[counts > 0]
    k = _n_bins(float(np.median(present)) if present.size else 0.0)
    b = _bin_of(tput, k)
    g = drive * k + b
    q = _grouped_quantiles(g, tput, n_drives * k, np.array([0.5]))[:, 0].reshape(n_drives, k)
    m = _grouped_quantiles(g, lat, n_drives * k, np.array([0.5]))[:, 0].reshape(n_drives, k)
    px, py = peer_median(q), peer_median(m)
    return [_curve(px[d], py[d]) for d in range(n_drives)]


def fit_ratio_quantiles(throughput: FloatArray, latency: FloatArray,
                        curve: Baseline) -> FloatArray:
    """[p10, p50, p90] of latency / curve(throughput) over some samples."""
    r = _ratios(np.asarray(latency, np.float64), curve(np.asarray(throughput, np.float64)))
    out: FloatArray = np.quantile(r, _FIT_QS) if r.size else np.full(3, np.nan)
    return out


def _fill_fit_columns(x3: FloatArray, ts: FloatArray, drive: IntArray, w: IntArray,
                      latency: FloatArray, throughput: FloatArray, keep: npt.NDArray[np.bool_],
                      baselines: dict[int, Baseline]) -> None:
    """fit_* columns of x3 ([drives, windows, features]) for the kept windows: each
    sample's ratio to its reference curve, then quantiles per (drive, window)."""
    n_drives, n_win = x3.shape[:2]
    usable = keep.reshape(n_drives, n_win)[drive, w]  # samples of kept (drive, window)s
    ratio = np.full(ts.size, np.nan)
    order = np.argsort(w, kind="stable")
    bounds = np.searchsorted(w[order], np.arange(n_win + 1))
    for win in range(n_win):
        idx = order[bounds[win]:bounds[win + 1]]
        idx = idx[usable[idx]]
        if idx.size == 0:
            continue
        d, t, y = drive[idx], throughput[idx], latency[idx]
        present = np.unique(d).tolist()
        curves = (_peer_curves(d, t, y, n_drives) if any(dd not in baselines for dd in present)
                  else [])
        for dd in present:
            c = baselines.get(dd) or (curves[dd] if curves else None)
            if c is not None:
                mine = d == dd
                ratio[idx[mine]] = _ratios(y[mine], c(t[mine]))
    ok = ~np.isnan(ratio)
    if not ok.any():
        return
    g = drive[ok] * n_win + w[ok]
    q = _grouped_quantiles(g, ratio[ok], n_drives * n_win, _FIT_QS)
    x3[:, :, _FIT_DST] = q.reshape(n_drives, n_win, _FIT_QS.size)


# ---- model input ------------------------------------------------------------


def select(x: FloatArray, names: tuple[str, ...] | list[str]) -> npt.NDArray[np.float32]:
    """The columns a model declares, in its order, as float32 (its input)."""
    try:
        cols = [FEATURE_INDEX[n] for n in names]
    except KeyError as e:
        raise FeatureError(f"unknown feature {e.args[0]!r}") from None
    return np.ascontiguousarray(x[:, cols], dtype=np.float32)


def missing_in_telemetry(names: tuple[str, ...] | list[str]) -> list[str]:
    """The declared features that drive telemetry cannot provide."""
    return [n for n in names if n in NOT_IN_TELEMETRY or n in SMART_FEATURES]
