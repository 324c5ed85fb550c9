"""Verdicts on drives from windows of samples: against their peers, or their own past.

Peers (after Perseus): the drives of one host that saw I/O in the window.
Their window features come from :func:`ml.features.telemetry_features` (the
same features the fail-slow model was trained on, per-interval latency and
throughput in, unit-free peer ratios out) and the model scores every drive of
every window in one onnxruntime call per tick.

A drive without a peer in the window is judged against its own history: a
:class:`Baseline` fits its latency as a function of its throughput while it is
healthy (least squares, refitted without samples more than 3 robust standard
deviations off, as :func:`ml.detect.detect_perseus` does over a host), and
that fit stands in for the peers: the ``peer_*`` ratios become the drive's
latency quantiles over what the baseline expects at the window's load (times
the quantiles of the baseline's own spread), and its throughput over the
baseline's.  The same model then scores it.

A model that declares the ``fit_*`` features (latency over a
latency-vs-throughput curve: the peers' curve, or the drive's own) gets them
from :func:`ml.features.telemetry_features` directly: a lone drive's healthy
samples go in as its ``baselines`` curve (``ml.features.fit_baseline``), and
its ``peer_*`` ratios stay neutral, as that model was trained.  Models without
them (the packaged reference model) get the substitution above.
:func:`window_features` is the one seam between the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import ml.features as _features
from ml.features import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    RATIO_CAP,
    TelemetryWindows,
    select,
    telemetry_features,
)
from ml.model import Model

FloatArray = npt.NDArray[np.float64]
_QS = np.array([0.5, 0.9, 0.99])


def needs_curves(model: Model) -> bool:
    """The model reads latency-vs-throughput fit features (``fit_*``)."""
    return any(n.startswith("fit_") for n in model.features)


def window_features(ts: FloatArray, drive: npt.NDArray[np.int64], latency: FloatArray,
                    throughput: FloatArray, window_s: float, min_samples: int,
                    own: Mapping[int, tuple[FloatArray, FloatArray]] | None = None
                    ) -> TelemetryWindows:
    """The feature rows of one window of the host's drives (the features seam).

    ``own``: drive index -> (throughput, latency) of its healthy past, for the
    drives judged against themselves by a model with ``fit_*`` features.
    """
    fit = getattr(_features, "fit_baseline", None)
    if own and fit is not None:
        curves: dict[int, Any] = {d: fit(t, y) for d, (t, y) in own.items()}
        out: TelemetryWindows = telemetry_features(ts, drive, latency, throughput, window_s,
                                                   min_samples, baselines=curves)
        return out
    return telemetry_features(ts, drive, latency, throughput, window_s, min_samples)


@dataclass(frozen=True)
class BaselineFit:
    """latency ~ a + b * throughput while healthy, and the spread around it."""

    a: float
    b: float
    ratio_q: tuple[float, float, float]   # quantiles 0.5/0.9/0.99 of latency / fit
    throughput: float                     # median throughput of the samples
    floor: float                          # smallest latency seen (the fit never goes below)
    samples: int

    def expected(self, throughput: FloatArray) -> FloatArray:
        out: FloatArray = np.maximum(self.a + self.b * throughput, self.floor)
        return out

    def to_json(self) -> dict[str, float | int | list[float]]:
        return {"a_us": self.a, "b_us_per_bps": self.b, "ratio_q": list(self.ratio_q),
                "throughput_bps": self.throughput, "floor_us": self.floor,
                "samples": self.samples}


def _robust_sigma(r: FloatArray) -> float:
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def fit_baseline(throughput: FloatArray, latency: FloatArray) -> BaselineFit:
    """A drive's own latency-vs-throughput model (the baseline seam).

    A straight line, refitted twice without outliers; a constant (the median)
    when the load hardly varied (a line through one cloud of points is noise)
    or when the line falls with load.
    """
    t = np.asarray(throughput, dtype=np.float64)
    y = np.asarray(latency, dtype=np.float64)
    keep = np.ones(t.size, dtype=bool)
    a, b = float(np.median(y)), 0.0
    spread = float(np.std(t) / np.mean(t)) if t.size and np.mean(t) > 0 else 0.0
    if spread >= 0.1 and t.size >= 8:
        for _ in range(3):
            design = np.stack([np.ones(int(keep.sum())), t[keep]], axis=1)
            coef = np.linalg.lstsq(design, y[keep], rcond=None)[0]
            a, b = float(coef[0]), float(coef[1])
            r = y - (a + b * t)
            sigma = _robust_sigma(r[keep])
            if sigma <= 0:
                break
            new = np.abs(r - np.median(r[keep])) <= 3 * sigma
            if new.sum() < 8 or (new == keep).all():
                break
            keep = new
        if b < 0:
            a, b = float(np.median(y[keep])), 0.0
    floor = float(max(np.min(y), 1e-3)) if y.size else 1e-3
    fit = BaselineFit(a, b, (1.0, 1.0, 1.0), float(np.median(t)) if t.size else 0.0, floor,
                      int(t.size))
    ratio = y / fit.expected(t)
    q = np.quantile(ratio, _QS) if ratio.size else np.ones(3)
    return BaselineFit(a, b, (float(q[0]), float(q[1]), float(q[2])), fit.throughput, floor,
                       int(t.size))


class Baseline:
    """A drive's healthy samples (a bounded ring) and the fit made from them."""

    def __init__(self, learn_samples: int = 60, capacity: int = 3600,
                 refit_every: int = 60) -> None:
        self.learn_samples = max(learn_samples, 8)
        self.capacity = max(capacity, self.learn_samples)
        self.refit_every = refit_every
        self._t = np.zeros(self.capacity)
        self._y = np.zeros(self.capacity)
        self.count = 0
        self._since_fit = 0
        self.fit: BaselineFit | None = None

    @property
    def state(self) -> str:
        return "ready" if self.fit is not None else "learning"

    def samples(self) -> tuple[FloatArray, FloatArray]:
        """(throughput, latency) of the healthy samples kept."""
        n = min(self.count, self.capacity)
        return self._t[:n].copy(), self._y[:n].copy()

    def add(self, throughput: float, latency_us: float) -> None:
        if not (np.isfinite(latency_us) and latency_us > 0 and np.isfinite(throughput)):
            return
        i = self.count % self.capacity
        self._t[i], self._y[i] = throughput, latency_us
        self.count += 1
        self._since_fit += 1
        n = min(self.count, self.capacity)
        if n >= self.learn_samples and (self.fit is None or self._since_fit >= self.refit_every):
            self.fit = fit_baseline(self._t[:n], self._y[:n])
            self._since_fit = 0

    def to_json(self) -> dict[str, object]:
        return {"state": self.state, "samples": min(self.count, self.capacity),
                "needed": self.learn_samples,
                "fit": self.fit.to_json() if self.fit is not None else None}


def baseline_ratios(fit: BaselineFit, latency: FloatArray,
                    throughput: FloatArray) -> dict[str, float]:
    """The ``peer_*`` ratios of one window with the baseline as the only peer."""
    expected = float(np.median(fit.expected(throughput)))
    q = np.quantile(latency, _QS)
    out = {}
    for name, mine, peer_q in (("peer_lat_ratio", q[0], fit.ratio_q[0]),
                               ("peer_p90_ratio", q[1], fit.ratio_q[1]),
                               ("peer_p99_ratio", q[2], fit.ratio_q[2])):
        ref = expected * peer_q
        out[name] = float(min(mine / ref, RATIO_CAP)) if ref > 0 else 1.0
    ref_t = fit.throughput
    mean_t = float(np.mean(throughput))
    out["peer_tput_ratio"] = (float(min(mean_t / ref_t, RATIO_CAP)) if ref_t > 0
                              else (1.0 if mean_t == 0 else RATIO_CAP))
    return out


@dataclass(frozen=True)
class WindowVerdict:
    """One drive's score in one tick (before the flag's hysteresis)."""

    drive: str
    judged_by: str | None        # "peers", "baseline" or None (not scored)
    score: float | None
    above: bool                  # score at or above the model's threshold
    samples: int
    features: dict[str, float]
    reason: str


def judge(windows: Mapping[str, tuple[FloatArray, FloatArray, FloatArray]],
          baselines: Mapping[str, Baseline], model: Model, window_s: float,
          min_samples: int) -> dict[str, WindowVerdict]:
    """Score every drive's window: one model call for all of them."""
    names = sorted(windows)
    counts = {n: int(windows[n][1].size) for n in names}
    valid = [n for n in names if counts[n] >= min_samples]
    out: dict[str, WindowVerdict] = {}
    for n in names:
        if n not in valid:
            out[n] = WindowVerdict(n, None, None, False, counts[n], {},
                                   f"too little I/O in the window ({counts[n]} of "
                                   f"{min_samples} intervals with I/O)")
    if not valid:
        return out
    idx = {n: i for i, n in enumerate(valid)}
    ts = np.concatenate([np.zeros(windows[n][1].size) for n in valid])
    drive = np.concatenate([np.full(windows[n][1].size, idx[n], dtype=np.int64)
                            for n in valid])
    lat = np.concatenate([windows[n][1] for n in valid])
    tput = np.concatenate([windows[n][2] for n in valid])
    curves = needs_curves(model)
    own: dict[int, tuple[FloatArray, FloatArray]] = {}
    if curves and len(valid) == 1:
        base = baselines.get(valid[0])
        if base is not None and base.fit is not None:
            own[0] = base.samples()
    # All samples in one window: the ring already holds just the window.
    tw = window_features(ts, drive, lat, tput, window_s=1.0, min_samples=min_samples,
                         own=own)
    rows: dict[str, npt.NDArray[np.float64]] = {valid[int(d)]: tw.x[i]
                                                for i, d in enumerate(tw.drive)}
    peers = len(rows) >= 2
    scored: list[tuple[str, str, npt.NDArray[np.float64]]] = []
    for n in valid:
        x = rows.get(n)
        if x is None:
            out[n] = WindowVerdict(n, None, None, False, counts[n], {}, "no features")
            continue
        if peers:
            scored.append((n, "peers", x))
            continue
        base = baselines.get(n)
        if base is None or base.fit is None:
            have = 0 if base is None else min(base.count, base.capacity)
            need = 0 if base is None else base.learn_samples
            out[n] = WindowVerdict(n, None, None, False, counts[n], _named(x),
                                   f"no peer with I/O; learning its own baseline "
                                   f"({have} of {need} samples)")
            continue
        if not curves:   # the baseline stands in for the peers
            x = x.copy()
            for name, v in baseline_ratios(base.fit, windows[n][1], windows[n][2]).items():
                x[FEATURE_INDEX[name]] = v
        scored.append((n, "baseline", x))
    if scored:
        matrix = np.stack([x for _, _, x in scored])
        scores, flags = model.predict(select(matrix, model.features))
        for i, (n, how, x) in enumerate(scored):
            feats = _named(x)
            score = float(scores[i])
            out[n] = WindowVerdict(n, how, score, bool(flags[i]), counts[n], feats,
                                   _reason(how, score, model.threshold, feats, len(rows)))
    return out


def _named(x: npt.NDArray[np.float64]) -> dict[str, float]:
    return {k: float(v) for k, v in zip(FEATURE_NAMES, x, strict=True) if np.isfinite(v)}


def _reason(how: str, score: float, threshold: float, f: Mapping[str, float],
            n_peers: int) -> str:
    whom = f"its {n_peers - 1} peer(s)" if how == "peers" else "its own baseline at this load"
    verdict = "slow" if score >= threshold else "normal"
    fit = (f"; latency over the latency-vs-throughput curve: median "
           f"{f['fit_lat_ratio_p50']:.2f}x" if "fit_lat_ratio_p50" in f else "")
    return (f"{verdict}: score {score:.2f} (threshold {threshold:g}); latency p50 "
            f"{f.get('peer_lat_ratio', float('nan')):.2f}x, p99 "
            f"{f.get('peer_p99_ratio', float('nan')):.2f}x, throughput "
            f"{f.get('peer_tput_ratio', float('nan')):.2f}x {whom}{fit}")
