"""Fail-slow detection over telemetry trees, with two baselines and metrics.

Three detectors, each giving one verdict per drive (``host, disk_id, flagged,
score``):

``model`` (default)
    An ONNX fail-slow model (the packaged drive model,
    :data:`ml.model.DRIVE_MODEL`, unless ``--model``) scores every (drive,
    window) row of :func:`ml.features.telemetry_features` that has all its
    features; a drive's score is a quantile of its window scores - the
    model's ``ublkml.drive_quantile`` metadata, else the 90th percentile (it
    must look slow in at least a tenth of its windows: one bad window is
    noise, a fault that starts late or comes in episodes still counts) -
    flagged at the model's threshold.
``peer2x``
    The 2x peer-median rule: a drive whose median latency over the whole
    period is at least twice the median of its host peers' medians.  Score:
    that ratio.
``perseus``
    After Perseus (FAST '23), simplified: per host, fit latency as a degree-2
    polynomial of throughput over all drives' samples, refitting twice without
    the samples more than 3 robust standard deviations (MAD) away; a sample is
    slow when above the fit by more than 3 robust standard deviations; a drive
    is flagged when at least 20 % of its samples are slow.  Score: that fraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ml.features import Baseline, missing_in_telemetry, select, telemetry_features
from ml.model import Model, ModelError
from ml.telemetry import HostData

METHODS = ("model", "peer2x", "perseus")
DEFAULT_WINDOW_S = 1800.0
DRIVE_QUANTILE = 0.9


@dataclass(frozen=True)
class Verdict:
    host: str
    disk_id: str
    flagged: bool
    score: float


def drive_scores_from_windows(drive: npt.NDArray[np.int64], scores: npt.NDArray[np.float32],
                              n_drives: int, q: float = DRIVE_QUANTILE) -> npt.NDArray[
                                  np.float64]:
    """Per drive, the q-quantile of its window scores (0 for a drive without windows)."""
    out = np.zeros(n_drives)
    for d in range(n_drives):
        s = scores[drive == d]
        if s.size:
            out[d] = float(np.quantile(s, q))
    return out


def drive_quantile(model: Model) -> float:
    """The quantile of its window scores that makes a drive's score, for ``model``."""
    raw = dict(model.info.extra).get("ublkml.drive_quantile")
    if raw is None:
        return DRIVE_QUANTILE
    try:
        q = float(raw)
    except ValueError:
        q = math.nan
    if not 0 <= q <= 1:
        raise ModelError(f"{model.info.path}: ublkml.drive_quantile must be in [0, 1], "
                         f"got {raw!r}")
    return q


def window_scores(host: HostData, model: Model, window_s: float = DEFAULT_WINDOW_S,
                  baselines: Mapping[int, Baseline] | None = None
                  ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(drive, score) for each window row of one host that has all the model's
    features (a drive without peers or baseline has no ``fit_*`` features)."""
    tw = telemetry_features(host.ts, host.drive, host.latency, host.throughput, window_s,
                            baselines=baselines)
    x = select(tw.x, model.features)
    ok = ~np.isnan(x).any(axis=1)
    if not ok.any():
        return tw.drive[ok], np.empty(0, dtype=np.float32)
    return tw.drive[ok], model.score(x[ok])


def detect_model(hosts: Iterable[HostData], model: Model, window_s: float = DEFAULT_WINDOW_S,
                 progress: Callable[[int, int], None] | None = None) -> list[Verdict]:
    if model.kind != "fail_slow":
        raise ModelError(f"{model.info.path}: a {model.kind} model; detection needs a "
                         "fail_slow model")
    missing = missing_in_telemetry(model.features)
    if missing:
        raise ModelError(f"{model.info.path}: needs {', '.join(missing)}, which drive "
                         "telemetry does not have")
    hosts = list(hosts)
    q = drive_quantile(model)
    out = []
    for i, h in enumerate(hosts):
        drive, s = window_scores(h, model, window_s)
        ds = drive_scores_from_windows(drive, s, len(h.disk_ids), q)
        out += [Verdict(h.host, d, bool(ds[j] >= model.threshold), float(ds[j]))
                for j, d in enumerate(h.disk_ids)]
        if progress is not None:
            progress(i + 1, len(hosts))
    return out


def detect_peer2x(hosts: Iterable[HostData], factor: float = 2.0) -> list[Verdict]:
    out = []
    for h in hosts:
        n = len(h.disk_ids)
        med = np.array([np.median(h.latency[h.drive == d]) for d in range(n)])
        for d in range(n):
            peers = np.delete(med, d)
            ratio = float(med[d] / np.median(peers)) if peers.size and np.median(
                peers) > 0 else 1.0
            out.append(Verdict(h.host, h.disk_ids[d], ratio >= factor, ratio))
    return out


def _robust_sigma(r: npt.NDArray[np.float64]) -> float:
    s = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return s if s > 0 else float(np.std(r)) or 1e-12


def detect_perseus(hosts: Iterable[HostData], degree: int = 2, z: float = 3.0,
                   slow_fraction: float = 0.2) -> list[Verdict]:
    out = []
    for h in hosts:
        x, y = h.throughput, h.latency
        # Scale throughput for a well-conditioned fit.
        xs = x / (float(np.max(x)) or 1.0)
        keep = np.ones(x.size, dtype=np.bool_)
        coef = np.polyfit(xs, y, degree)
        for _ in range(2):  # outlier removal, then refit
            r = y - np.polyval(coef, xs)
            keep = np.abs(r - np.median(r[keep])) <= z * _robust_sigma(r[keep])
            if keep.sum() > degree + 1:
                coef = np.polyfit(xs[keep], y[keep], degree)
        r = y - np.polyval(coef, xs)
        bound = z * _robust_sigma(r[keep])
        slow = r > bound
        for d, disk in enumerate(h.disk_ids):
            mine = h.drive == d
            frac = float(slow[mine].mean()) if mine.any() else 0.0
            out.append(Verdict(h.host, disk, frac >= slow_fraction, frac))
    return out


def metrics(verdicts: Iterable[Verdict], labels: set[tuple[str, str]]) -> dict[str, float]:
    """Confusion counts, precision, recall, F1 and MCC of drive verdicts."""
    tp = fp = fn = tn = 0
    for v in verdicts:
        truth = (v.host, v.disk_id) in labels
        if v.flagged and truth:
            tp += 1
        elif v.flagged:
            fp += 1
        elif truth:
            fn += 1
        else:
            tn += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / den if den else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "f1": f1, "mcc": mcc}


def run(method: str, hosts: list[HostData], model: Model | None = None,
        window_s: float = DEFAULT_WINDOW_S,
        progress: Callable[[int, int], None] | None = None) -> list[Verdict]:
    """One detector over hosts read with :func:`ml.telemetry.read_tree`."""
    if method == "model":
        if model is None:
            from ml.model import drive_model

            model = drive_model()
        return detect_model(hosts, model, window_s, progress)
    if method == "peer2x":
        return detect_peer2x(hosts)
    if method == "perseus":
        return detect_perseus(hosts)
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
