"""Reproducible training that exports ONNX models following the plug-in contract.

Needs the optional extra ``train`` (scikit-learn, skl2onnx, onnx); scoring does
not.  Everything is seeded: the same data and seed give the same model bytes.

Fail-slow (telemetry in the Perseus layout + labels)
    Rows are the (drive, window) rows of :func:`ml.features.telemetry_features`,
    reduced to the unit-free peer ratios (:data:`FAIL_SLOW_FEATURES`), so that a
    model trained on drive telemetry also scores a live device's paths.  Only
    drive labels exist (as in the public data), so every window of a labelled
    drive is a positive: the classifier learns "looks like a window of a slow
    drive".  The threshold is the one that maximises the drive-level MCC of
    out-of-fold scores (folds by host), with drive scores as in
    :mod:`ml.detect`.
Failure (Backblaze SMART history)
    Rows are drive-days; a row is positive when its drive fails within the
    horizon (7 days).  Threshold: best drive-level MCC out of fold (folds by
    drive), where a drive is flagged when any of its rows is.

``python -m ml.train reference`` rebuilds the packaged models from generated
data (:mod:`ml.synth`, preset ``train``, seed 1) and evaluates them on the
``heldout`` presets (seed 2).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ml import detect, synth
from ml.features import SMART_FEATURES, fit_baseline, select, telemetry_features
from ml.model import MODELS_DIR, ModelError, load_model_bytes
from ml.smart import SmartHistory, failure_labels, read_backblaze
from ml.telemetry import (
    HostData,
    dropped_rows,
    find_labels,
    read_labels,
    read_tree,
    tree_window,
)

FAIL_SLOW_FEATURES = ("peer_lat_ratio", "peer_p90_ratio", "peer_p99_ratio", "peer_tput_ratio")
FAILURE_FEATURES = SMART_FEATURES
HORIZON_DAYS = 7
#: what ``ublkml ml train`` can train
TRAINABLE = ("reference", "fail-slow", "drive-fail-slow", "failure")
REFERENCE_SEED = 1
HELDOUT_SEED = 2


class TrainError(ModelError):
    """Training cannot run (missing extra, no positives, ...)."""


def _sklearn() -> Any:
    try:
        import onnx  # noqa: F401
        import skl2onnx  # type: ignore[import-untyped]  # noqa: F401
        import sklearn  # type: ignore[import-untyped]
    except ImportError as e:
        raise TrainError(f"training needs the optional extra 'train' ({e.name} is missing): "
                         "pip install 'ublkml[train]'") from None
    return sklearn


def _classifier(seed: int) -> Any:
    _sklearn()
    from sklearn.ensemble import GradientBoostingClassifier  # type: ignore[import-untyped]

    # Shallow boosted trees: non-linear in the ratios, small once exported
    # (tens of KB), microseconds to score a batch.
    return GradientBoostingClassifier(n_estimators=60, max_depth=3, learning_rate=0.1,
                                      subsample=0.8, random_state=seed)


#: the direction in which a fail-slow feature may move a score: a drive's latency
#: above its peers' (or its curve's) can only add to the evidence, and serving more
#: than its peers can only take from it.  Unconstrained trees learn artefacts of
#: the training data instead: boosted trees scored a healthy drive whose p99 fell
#: to 0.03x its peers' (one peer turned slow and pulled their median up) as slow.
FAIL_SLOW_MONOTONE = {"peer_lat_ratio": 1, "peer_p90_ratio": 1, "peer_p99_ratio": 1,
                      "peer_tput_ratio": -1, "fit_lat_ratio_p10": 1,
                      "fit_lat_ratio_p50": 1, "fit_lat_ratio_p90": 1}


def _monotone_classifier(seed: int, constraints: Sequence[int], balanced: bool) -> Any:
    _sklearn()
    from sklearn.ensemble import RandomForestClassifier

    # A forest, not boosted trees: scikit-learn's boosted classifiers that take
    # monotonic constraints (HistGradientBoosting) do not convert to ONNX with
    # skl2onnx 1.20, and a mean of monotone trees is monotone.  Deep enough for
    # the interactions of the ratios, leaves of 20 rows so that no tree memorises
    # one host.
    return RandomForestClassifier(n_estimators=60, max_depth=6, min_samples_leaf=20,
                                  max_features=None, monotonic_cst=list(constraints),
                                  class_weight="balanced" if balanced else None,
                                  random_state=seed, n_jobs=1)


#: bound on a tree leaf's value (log-odds).  Gradient boosting's Newton step on
#: a pure leaf divides by a vanishing hessian and can give values like 1e63,
#: which overflow float32 in ONNX (inf - inf: NaN scores).  1e4 is still
#: "certain" after the learning rate (the logistic saturates far below), so
#: the scores do not change; only the overflow goes.
LEAF_CAP = 1e4


def _fit(seed: int, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
         features: Sequence[str] | None = None, balanced: bool = False) -> Any:
    """A fitted classifier; monotone in ``features`` when they are all fail-slow
    features (:data:`FAIL_SLOW_MONOTONE`), else boosted trees.  ``balanced``:
    weigh the classes equally (a forest's only)."""
    if features is not None and all(f in FAIL_SLOW_MONOTONE for f in features):
        return _monotone_classifier(seed, [FAIL_SLOW_MONOTONE[f] for f in features],
                                    balanced).fit(x, y)
    clf = _classifier(seed).fit(x, y)
    for est in clf.estimators_.ravel():
        v = est.tree_.value  # a writable view of the tree's buffer
        np.clip(v, -LEAF_CAP, LEAF_CAP, out=v)
    return clf


def export_onnx(clf: Any, features: Sequence[str], kind: str, output: str, threshold: float,
                version: str, doc: str = "", extra: dict[str, str] | None = None) -> bytes:
    """A fitted binary classifier as ONNX bytes with the ublkml metadata."""
    _sklearn()
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    proto = to_onnx(clf, initial_types=[("input", FloatTensorType([None, len(features)]))],
                    options={id(clf): {"zipmap": False}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    meta = {"ublkml.kind": kind, "ublkml.features": ",".join(features),
            "ublkml.output": output, "ublkml.threshold": f"{threshold:.6g}",
            "ublkml.version": version, **(extra or {})}
    # skl2onnx lists the opsets in set order, which varies between processes: fix it
    # (ai.onnx.ml first, as in the packaged files) so that a seed gives the same bytes.
    opsets = sorted(((o.domain, o.version) for o in proto.opset_import), reverse=True)
    del proto.opset_import[:]
    for domain, op_version in opsets:
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, op_version
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = doc
    proto.producer_name = "ublkml.ml.train"
    data: bytes = proto.SerializeToString()
    load_model_bytes(data, "<trained model>", expect_kind=kind)  # refuse to emit a bad one
    return data


def best_mcc_threshold(scores: npt.NDArray[np.float64],
                       truth: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """(threshold, MCC) maximising MCC of ``scores >= threshold``."""
    best = (0.5, -1.0)
    for t in np.unique(np.round(scores, 4)):
        if t <= 0:
            continue
        f = scores >= t
        tp = float(np.sum(f & truth))
        fp = float(np.sum(f & ~truth))
        fn = float(np.sum(~f & truth))
        tn = float(np.sum(~f & ~truth))
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / den if den else 0.0
        if mcc > best[1]:
            best = (float(t), mcc)
    return best


# ---- fail-slow -----------------------------------------------------------------


@dataclass
class _Windows:
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    host: npt.NDArray[np.int64]      # index into the hosts list
    drive: npt.NDArray[np.int64]     # global drive index
    drive_truth: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class TrainingSet:
    """One labelled telemetry tree and the window its features use."""

    hosts: list[HostData]
    labels: set[tuple[str, str]]
    window_s: float = detect.DEFAULT_WINDOW_S


def load_training_set(root: str, labels: str | None = None,
                      window_s: float | None = None,
                      progress: Callable[[int, int], None] | None = None) -> TrainingSet:
    """A tree, its labels (default ``root/labels.csv``) and its window (default:
    ``root/recording.json``'s ``window_s``, else 30 min)."""
    hosts = read_tree(root, progress=progress)
    return TrainingSet(hosts, read_labels(labels or os.path.join(root, "labels.csv")),
                       window_s or tree_window(root) or detect.DEFAULT_WINDOW_S)


def _windows(sets: Sequence[TrainingSet]) -> _Windows:
    xs, ys, hs, ds, truth = [], [], [], [], []
    base = 0
    i = 0
    for ts in sets:
        for h in ts.hosts:
            tw = telemetry_features(h.ts, h.drive, h.latency, h.throughput, ts.window_s)
            lab = np.array([(h.host, d) in ts.labels for d in h.disk_ids])
            xs.append(select(tw.x, FAIL_SLOW_FEATURES))
            ys.append(lab[tw.drive].astype(np.int64))
            hs.append(np.full(tw.drive.size, i, dtype=np.int64))
            ds.append(tw.drive + base)
            truth.append(lab)
            base += len(h.disk_ids)
            i += 1
    return _Windows(np.concatenate(xs), np.concatenate(ys), np.concatenate(hs),
                    np.concatenate(ds), np.concatenate(truth))


def train_fail_slow(hosts: list[HostData], labels: set[tuple[str, str]], seed: int = 0,
                    window_s: float = detect.DEFAULT_WINDOW_S, version: str = "1",
                    folds: int = 4, extra: Sequence[TrainingSet] = ()
                    ) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, report) of a fail-slow model trained on telemetry.

    ``extra``: more labelled trees, each with its own window (recorded
    telemetry has 1-s rows and 30-s windows, generated 60-s rows and 30-min
    windows: the features are unit-free ratios, so both can train one model).
    """
    sets = [TrainingSet(hosts, labels, window_s), *extra]
    w = _windows(sets)
    if w.y.sum() == 0 or w.y.sum() == w.y.size:
        raise TrainError("the labels must name some, but not all, drives of the telemetry")
    # Out-of-fold drive scores (folds by host, as peers share a host) pick the
    # threshold without looking at a model's own training rows.
    rng = np.random.default_rng(seed)
    fold_of_host = rng.permutation(sum(len(ts.hosts) for ts in sets)) % folds
    oof = np.zeros(w.y.size)
    for k in range(folds):
        test = fold_of_host[w.host] == k
        if not test.any() or w.y[~test].min() == w.y[~test].max():
            continue
        clf = _fit(seed, w.x[~test], w.y[~test], FAIL_SLOW_FEATURES)
        oof[test] = clf.predict_proba(w.x[test])[:, 1]
    ds = detect.drive_scores_from_windows(w.drive, oof.astype(np.float32), w.drive_truth.size)
    threshold, mcc = best_mcc_threshold(ds, w.drive_truth)
    clf = _fit(seed, w.x, w.y, FAIL_SLOW_FEATURES)
    data = export_onnx(clf, FAIL_SLOW_FEATURES, "fail_slow",
                       "probability that the path's window looks like that of a fail-slow "
                       "drive (class 1 of a random forest, monotone in the ratios)",
                       threshold, version,
                       doc=f"ublkml fail-slow model, seed {seed}, window "
                       + ", ".join(f"{ts.window_s:g}" for ts in sets) + " s")
    report: dict[str, Any] = {
        "kind": "fail_slow", "windows": int(w.y.size), "positive_windows": int(w.y.sum()),
        "drives": int(w.drive_truth.size), "slow_drives": int(w.drive_truth.sum()),
        "threshold": threshold, "oof_drive_mcc": mcc, "features": list(FAIL_SLOW_FEATURES)}
    if extra:
        report["sets"] = [{"hosts": len(ts.hosts), "drives": sum(len(h.disk_ids)
                                                                 for h in ts.hosts),
                           "slow_drives": len(ts.labels), "window_s": ts.window_s}
                          for ts in sets]
    return data, report


# ---- the drive model: real fleet telemetry, folds by host ------------------------

#: what the drive model reads: each window's latency against its peers' (or its own
#: baseline's) latency-vs-throughput curve, median and both tails
DRIVE_FEATURES = ("fit_lat_ratio_p10", "fit_lat_ratio_p50", "fit_lat_ratio_p90")
#: a drive's score is the median of its window scores: a real fleet's healthy drives
#: have bad hours (a tenth of a noisy drive's windows can look slow), slow drives are
#: slow for days
DRIVE_MODEL_QUANTILE = 0.5
DRIVE_SEED = 1
#: the drive model weighs slow and healthy drives' windows equally.  Its positives
#: are 30 of 1,136 drives: unweighted, the forest leaves the mild (1.26x) drives at
#: window scores below 0.1 and a threshold of 0.04 that does not carry to a cluster
#: it has not seen (leave-one-cluster-out MCC 0.13 against 0.91 weighted).  The
#: per-path model is not weighted: weighted, it scores two healthy loop devices
#: 1.3x apart on one disk at 0.65 against a threshold of 0.67.
DRIVE_BALANCED = True
DRIVE_FOLDS = 5
#: slowdowns injected into the healthy drives (after their first day) to see what the
#: self-baseline catches: the mild end and the middle of the fleet's slow drives
SELF_BASELINE_INJECT = (1.2, 1.5)


def cluster_of(host: str) -> str:
    """The group of a host: the first part of its path (``cluster_A/host_1``), else ''."""
    return host.split("/", 1)[0] if "/" in host else ""


@dataclass
class DriveRows:
    """Window rows of a labelled tree for the drive model; drives numbered globally."""

    x: npt.NDArray[np.float32]
    drive: npt.NDArray[np.int64]           # row -> drive
    host_of: npt.NDArray[np.int64]         # drive -> host index
    truth: npt.NDArray[np.bool_]           # drive -> labelled slow
    names: list[tuple[str, str]]           # drive -> (host, disk_id)
    hosts: list[str]


def drive_rows(hosts: Sequence[HostData], labels: set[tuple[str, str]],
               window_s: float = detect.DEFAULT_WINDOW_S,
               baselines_from_first_day: bool = False, inject: float = 1.0,
               progress: Callable[[int, int], None] | None = None) -> DriveRows:
    """The drive model's rows.  With ``baselines_from_first_day`` every drive is
    judged against its own baseline (:func:`ml.features.fit_baseline`) fitted
    to its first 24 h, on the samples after them (peers unused); ``inject``
    then multiplies the later latencies of the unlabelled drives (a slowdown
    injected into real healthy drives)."""
    xs, ds, host_of, truth, names = [], [], [], [], []
    base = 0
    for i, h in enumerate(hosts):
        ts, drive, lat, tput = h.ts, h.drive, h.latency, h.throughput
        baselines = None
        if baselines_from_first_day:
            first = ts < ts.min() + 86400
            baselines = {d: fit_baseline(tput[first & (drive == d)], lat[first & (drive == d)])
                         for d in np.unique(drive[first]).tolist()}
            ts, drive, lat, tput = ts[~first], drive[~first], lat[~first], tput[~first]
            if inject != 1.0:
                healthy = np.array([(h.host, d) not in labels for d in h.disk_ids])
                lat = np.where(healthy[drive], lat * inject, lat)
        n = len(h.disk_ids)
        if ts.size:
            tw = telemetry_features(ts, drive, lat, tput, window_s, baselines=baselines)
            x = select(tw.x, DRIVE_FEATURES)
            ok = ~np.isnan(x).any(axis=1)
            xs.append(x[ok])
            ds.append(tw.drive[ok] + base)
        host_of += [i] * n
        truth += [(h.host, d) in labels for d in h.disk_ids]
        names += [(h.host, d) for d in h.disk_ids]
        base += n
        if progress is not None:
            progress(i + 1, len(hosts))
    return DriveRows(np.concatenate(xs) if xs else np.empty((0, len(DRIVE_FEATURES)),
                                                            np.float32),
                     np.concatenate(ds) if ds else np.empty(0, np.int64),
                     np.array(host_of, dtype=np.int64), np.array(truth, dtype=np.bool_),
                     names, [h.host for h in hosts])


def host_folds(hosts: Sequence[str], slow_hosts: set[str], k: int, seed: int
               ) -> npt.NDArray[np.int64]:
    """Fold of each host: hosts never split.  Hosts with a slow drive first, then the
    others, each cluster's hosts in a seeded shuffle, dealt round-robin: every fold
    gets slow drives (when there are ``k`` such hosts) and each cluster's share."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(hosts), dtype=np.int64)
    dealt = 0
    strata: dict[tuple[str, bool], list[int]] = {}
    for i, h in enumerate(hosts):
        strata.setdefault((cluster_of(h), h in slow_hosts), []).append(i)
    for key in sorted(strata, key=lambda s: (not s[1], s[0])):
        members = strata[key]
        for j in rng.permutation(len(members)):
            fold[members[j]] = dealt % k
            dealt += 1
    return fold


def midpoint_threshold(scores: npt.NDArray[np.float64],
                       truth: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """(threshold, MCC): the best-MCC cut of ``scores``, placed halfway between the
    lowest flagged score and the highest score below it (not on a drive's score,
    where the next fleet's drive would fall on either side by chance)."""
    values = np.unique(scores)
    best_t, best = float(values[-1]) if values.size else 0.5, -1.0
    for t in values:
        f = scores >= t
        tp, fp = float(np.sum(f & truth)), float(np.sum(f & ~truth))
        fn, tn = float(np.sum(~f & truth)), float(np.sum(~f & ~truth))
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / den if den else 0.0
        if mcc > best:
            best_t, best = float(t), mcc
    below = values[values < best_t]
    t = (best_t + float(below[-1])) / 2 if below.size else best_t
    return float(min(max(t, 1e-6), 1.0)), best


def _drive_scores(clf: Any, rows: DriveRows, drives: npt.NDArray[np.bool_]
                  ) -> npt.NDArray[np.float64]:
    """Scores of the chosen drives (0 for a drive without windows), others NaN."""
    out = np.full(rows.truth.size, np.nan)
    out[drives] = 0.0
    sel = drives[rows.drive]
    if sel.any():
        p = clf.predict_proba(rows.x[sel])[:, 1].astype(np.float32)
        ds = detect.drive_scores_from_windows(rows.drive[sel], p, rows.truth.size,
                                              DRIVE_MODEL_QUANTILE)
        have = np.zeros(rows.truth.size, dtype=np.bool_)
        have[rows.drive[sel]] = True
        out[drives & have] = ds[drives & have]
    return out


def _oof(rows: DriveRows, fold_of_drive: npt.NDArray[np.int64], seed: int,
         train_drives: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Out-of-fold drive scores over ``train_drives`` (NaN elsewhere)."""
    out = np.full(rows.truth.size, np.nan)
    for k in np.unique(fold_of_drive[train_drives]):
        test = train_drives & (fold_of_drive == k)
        fit_on = (train_drives & ~test)[rows.drive]
        if not fit_on.any() or rows.truth[train_drives & ~test].all() \
                or not rows.truth[train_drives & ~test].any():
            raise TrainError("a training fold has no slow (or no healthy) drive: use fewer "
                             "folds")
        clf = _fit(seed, rows.x[fit_on], rows.truth[rows.drive[fit_on]].astype(np.int64),
                   DRIVE_FEATURES, balanced=DRIVE_BALANCED)
        s = _drive_scores(clf, rows, test)
        out[test] = s[test]
    return out


def _evaluate_split(rows: DriveRows, outer: npt.NDArray[np.int64], inner_k: int, seed: int,
                    slow_hosts: set[str], extra: Sequence[DriveRows] = ()
                    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_],
                               list[npt.NDArray[np.bool_]]]:
    """Nested evaluation for an outer split of the drives (``outer``: drive -> group).
    Per outer group: the threshold from out-of-fold scores of the training hosts
    (``inner_k`` folds by host), the model from all training hosts; returns the
    held-out scores, flags, and the flags of each ``extra`` row set (the same
    drives judged otherwise, e.g. against their own baseline)."""
    scores = np.full(rows.truth.size, np.nan)
    flags = np.zeros(rows.truth.size, dtype=np.bool_)
    extra_flags = [np.zeros(rows.truth.size, dtype=np.bool_) for _ in extra]
    for g in np.unique(outer):
        test = outer == g
        train_hosts = sorted({int(h) for h in rows.host_of[~test]})
        inner_host = host_folds([rows.hosts[h] for h in train_hosts], slow_hosts, inner_k, seed)
        fold_of_host = np.full(len(rows.hosts), -1, dtype=np.int64)
        fold_of_host[train_hosts] = inner_host
        inner = _oof(rows, fold_of_host[rows.host_of], seed, ~test)
        threshold, _ = midpoint_threshold(inner[~test], rows.truth[~test])
        fit_on = (~test)[rows.drive]
        clf = _fit(seed, rows.x[fit_on], rows.truth[rows.drive[fit_on]].astype(np.int64),
                   DRIVE_FEATURES, balanced=DRIVE_BALANCED)
        s = _drive_scores(clf, rows, test)
        scores[test] = s[test]
        flags[test] = s[test] >= threshold
        for e, ef in zip(extra, extra_flags, strict=True):
            es = _drive_scores(clf, e, test)
            ef[test] = es[test] >= threshold
    return scores, flags, extra_flags


def _table(names: list[tuple[str, str]], labels: set[tuple[str, str]],
           flags: dict[str, npt.NDArray[np.bool_]]) -> dict[str, dict[str, dict[str, float]]]:
    """method -> cluster ('all' first) -> metrics."""
    clusters = ["all", *sorted({cluster_of(h) for h, _ in names})]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, f in flags.items():
        out[method] = {}
        for c in clusters:
            v = [detect.Verdict(h, d, bool(f[i]), 0.0) for i, (h, d) in enumerate(names)
                 if c == "all" or cluster_of(h) == c]
            out[method][c] = detect.metrics(v, labels)
    return out


def train_drive_model(hosts: list[HostData], labels: set[tuple[str, str]], seed: int = DRIVE_SEED,
                      window_s: float = detect.DEFAULT_WINDOW_S, folds: int = DRIVE_FOLDS,
                      loco: bool = False, self_baseline: bool = False, version: str = "1",
                      quiet: bool = True) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, report) of the drive model, with its cross-validated evaluation.

    Evaluation of record: ``folds`` folds by host (stratified: every fold has slow
    drives), nested - each outer fold's threshold comes from out-of-fold scores of
    its training hosts only; both baselines on the same drives, per cluster.
    ``loco``: also leave one cluster out (the first part of the host path).
    ``self_baseline``: also judge every held-out drive against its own first day
    instead of its peers, with the same outer models and thresholds.
    The shipped threshold is the midpoint threshold of the (non-nested) out-of-fold
    scores over all hosts; the shipped model is fitted on all hosts.
    """
    say = _say(quiet)
    if folds < 2:
        raise TrainError(f"--cv needs at least 2 folds, got {folds}")
    say(f"features of {len(hosts)} hosts ({window_s:g}-s windows)")
    rows = drive_rows(hosts, labels, window_s)
    if not rows.truth.any() or rows.truth.all():
        raise TrainError("the labels must name some, but not all, drives of the telemetry")
    unknown = labels - set(rows.names)
    if unknown:
        say(f"warning: {len(unknown)} labelled drives are not in the telemetry")
    slow_hosts = {h for (h, _), t in zip(rows.names, rows.truth, strict=True) if t}
    fold_of_host = host_folds(rows.hosts, slow_hosts, folds, seed)
    say(f"{folds}-fold cross-validation by host (nested threshold)")
    extra = []
    if self_baseline:
        say("self-baseline rows (first 24 h of each drive; also with "
            + ", ".join(f"{f:g}x" for f in SELF_BASELINE_INJECT) + " injected)")
        extra = [drive_rows(hosts, labels, window_s, baselines_from_first_day=True,
                            inject=f) for f in (1.0, *SELF_BASELINE_INJECT)]
    scores, flags, extra_flags = _evaluate_split(rows, fold_of_host[rows.host_of],
                                                 max(folds - 1, 2), seed, slow_hosts, extra)
    base = {m: np.array([v.flagged for v in detect.run(m, hosts)]) for m in ("peer2x",
                                                                              "perseus")}
    table = {"model": flags, **base}
    report: dict[str, Any] = {
        "kind": "fail_slow", "model": "drive", "features": list(DRIVE_FEATURES),
        "window_s": window_s, "drive_quantile": DRIVE_MODEL_QUANTILE, "seed": seed,
        "hosts": len(hosts), "drives": int(rows.truth.size),
        "slow_drives": int(rows.truth.sum()), "windows": int(rows.drive.size),
        "cv": {"folds": folds, "grouping": "host", "threshold": "nested",
               "metrics": _table(rows.names, labels, table),
               "slow_drive_scores": {f"{h}:{d}": round(float(scores[i]), 4)
                                     for i, (h, d) in enumerate(rows.names) if rows.truth[i]},
               "max_healthy_score": round(float(np.nanmax(scores[~rows.truth])), 4)}}
    if self_baseline:
        healthy = ~rows.truth
        report["self_baseline"] = {
            "baseline": "each drive's first 24 h; judged on the rest, peers unused",
            "metrics": _table(rows.names, labels, {"model": extra_flags[0]})["model"],
            "injected": {f"{f:g}": {"healthy_drives": int(healthy.sum()),
                                    "flagged": int(np.sum(fl & healthy))}
                         for f, fl in zip(SELF_BASELINE_INJECT, extra_flags[1:],
                                          strict=True)}}
    if loco:
        clusters = sorted({cluster_of(h) for h in rows.hosts})
        if len(clusters) < 2:
            raise TrainError("--loco needs hosts in at least two clusters "
                             "(DIR/<cluster>/<host>/)")
        say(f"leave one cluster out ({', '.join(clusters)})")
        group = np.array([clusters.index(cluster_of(rows.hosts[h])) for h in rows.host_of])
        _, lflags, _ = _evaluate_split(rows, group, folds, seed, slow_hosts)
        report["leave_one_cluster_out"] = _table(rows.names, labels,
                                                 {"model": lflags, **base})
    say("threshold from out-of-fold scores; final model on all hosts")
    oof = _oof(rows, fold_of_host[rows.host_of], seed, np.ones(rows.truth.size, np.bool_))
    threshold, oof_mcc = midpoint_threshold(oof, rows.truth)
    clf = _fit(seed, rows.x, rows.truth[rows.drive].astype(np.int64), DRIVE_FEATURES,
               balanced=DRIVE_BALANCED)
    data = export_onnx(
        clf, DRIVE_FEATURES, "fail_slow",
        "probability that the drive's window looks like that of a fail-slow drive, from its "
        "latency against its peers' (or its own baseline's) latency-vs-throughput curve "
        "(class 1 of a random forest, monotone in the ratios); a drive's score is the "
        f"{DRIVE_MODEL_QUANTILE:g} quantile of its window scores", threshold, version,
        doc=f"ublkml drive fail-slow model, seed {seed}, window {window_s:g} s, "
            f"{len(hosts)} hosts", extra={"ublkml.drive_quantile": f"{DRIVE_MODEL_QUANTILE:g}"})
    report.update({"threshold": threshold, "oof_drive_mcc": oof_mcc, "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()})
    return data, report


def format_drive_report(rep: dict[str, Any]) -> str:
    """The cross-validation tables of :func:`train_drive_model`, as text."""
    lines = [f"drive model: {rep['hosts']} hosts, {rep['drives']} drives, {rep['slow_drives']} "
             f"slow, {rep['windows']} windows of {rep['window_s']:g} s; threshold "
             f"{rep['threshold']:.4g} (out-of-fold MCC {rep['oof_drive_mcc']:.3f}), "
             f"{rep['bytes']} bytes, sha256 {rep['sha256']}"]

    def table(title: str, t: dict[str, dict[str, dict[str, float]]]) -> None:
        lines.append(title)
        lines.append(f"  {'method':<8} {'cluster':<10} {'MCC':>6} {'precision':>9} "
                     f"{'recall':>6}   tp/fp/fn/tn")
        for method, per in t.items():
            for c, m in per.items():
                lines.append(f"  {method:<8} {c:<10} {m['mcc']:6.3f} {m['precision']:9.3f} "
                             f"{m['recall']:6.3f}   {m['tp']}/{m['fp']}/{m['fn']}/{m['tn']}")

    table(f"{rep['cv']['folds']}-fold cross-validation by host (nested threshold):",
          rep["cv"]["metrics"])
    if "leave_one_cluster_out" in rep:
        table("leave one cluster out:", rep["leave_one_cluster_out"])
    if "self_baseline" in rep:
        table("self-baseline (first 24 h), same folds:", {"model": rep["self_baseline"]
                                                          ["metrics"]})
        for f, r in rep["self_baseline"]["injected"].items():
            lines.append(f"  healthy drives slowed {f}x after their first day: "
                         f"{r['flagged']} of {r['healthy_drives']} flagged")
    return "\n".join(lines)


# ---- failure -------------------------------------------------------------------


def _drive_flags(serial: npt.NDArray[np.str_], flags: npt.NDArray[np.bool_]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for s, f in zip(serial, flags, strict=True):
        out[str(s)] = out.get(str(s), False) or bool(f)
    return out


def failure_drive_metrics(h: SmartHistory, scores: npt.NDArray[np.float64], threshold: float,
                          horizon_days: int = HORIZON_DAYS) -> dict[str, float]:
    """Drive-level: a failing drive counts as caught if flagged within the horizon
    before its failure; a healthy drive is a false alarm if flagged on any day."""
    y = failure_labels(h, horizon_days).astype(bool)
    failing = {str(s) for s in h.serial[h.failure == 1]}
    flagged = scores >= threshold
    caught = _drive_flags(h.serial, flagged & y)
    alarm = _drive_flags(h.serial, flagged & ~y)
    tp = sum(1 for s in failing if caught.get(s))
    fn = len(failing) - tp
    fp = sum(1 for s, a in alarm.items() if a and s not in failing)
    healthy = len({str(s) for s in h.serial} - failing)
    tn = healthy - fp
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    den = float(np.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "mcc": (tp * tn - fp * fn) / den if den else 0.0}


def train_failure(h: SmartHistory, seed: int = 0, horizon_days: int = HORIZON_DAYS,
                  version: str = "1", folds: int = 4) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes, report) of a failure predictor trained on SMART history."""
    y = failure_labels(h, horizon_days)
    if y.sum() == 0:
        raise TrainError("no drive fails in the SMART history: nothing to learn")
    x = h.x.astype(np.float32)
    serials, drive = np.unique(h.serial, return_inverse=True)
    rng = np.random.default_rng(seed)
    fold_of_drive = rng.permutation(serials.size) % folds
    oof = np.zeros(y.size)
    for k in range(folds):
        test = fold_of_drive[drive] == k
        if not test.any() or y[~test].min() == y[~test].max():
            continue
        oof[test] = _fit(seed, x[~test], y[~test]).predict_proba(x[test])[:, 1]
    best = (0.5, -1.0)
    for t in np.unique(np.round(oof, 3)):
        if t > 0:
            m = failure_drive_metrics(h, oof, float(t), horizon_days)["mcc"]
            if m > best[1]:
                best = (float(t), m)
    clf = _fit(seed, x, y)
    data = export_onnx(clf, FAILURE_FEATURES, "failure",
                       f"probability that the drive fails within {horizon_days} days",
                       best[0], version, doc=f"ublkml failure model, seed {seed}")
    return data, {"kind": "failure", "rows": int(y.size), "positive_rows": int(y.sum()),
                  "drives": int(serials.size), "threshold": best[0], "oof_drive_mcc": best[1],
                  "features": list(FAILURE_FEATURES)}


# ---- reference models and their evaluation ---------------------------------------


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return say


def evaluate_fail_slow(tree: str, model_bytes: bytes) -> dict[str, dict[str, float]]:
    """MCC & co. of the model and both baselines on a labelled telemetry tree
    (with the tree's window: ``recording.json``, else 30 min)."""
    hosts = read_tree(tree)
    labels = read_labels(os.path.join(tree, "labels.csv"))
    model = load_model_bytes(model_bytes, "<model>")
    window = tree_window(tree) or detect.DEFAULT_WINDOW_S
    return {m: detect.metrics(detect.run(m, hosts, model, window), labels)
            for m in detect.METHODS}


def reference(out_dir: str = MODELS_DIR, quiet: bool = False,
              evaluate: bool = True) -> dict[str, Any]:
    """Rebuild the packaged models (and evaluate them on held-out data)."""
    say = _say(quiet)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ublkml-train-") as tmp:
        t0 = time.monotonic()
        tel = os.path.join(tmp, "telemetry-train")
        say(f"generating training telemetry (preset train, seed {REFERENCE_SEED})")
        synth.make_telemetry(tel, REFERENCE_SEED, synth.PRESETS["train"])
        hosts = read_tree(tel)
        fs, rep = train_fail_slow(hosts, read_labels(os.path.join(tel, "labels.csv")),
                                  seed=REFERENCE_SEED, version="1.0")
        report["fail_slow"] = rep
        say(f"fail_slow: {rep['windows']} windows, threshold {rep['threshold']:.3f}, "
            f"out-of-fold drive MCC {rep['oof_drive_mcc']:.3f}")
        smart_dir = os.path.join(tmp, "smart-train")
        say(f"generating training SMART history (preset train, seed {REFERENCE_SEED})")
        synth.make_smart(smart_dir, REFERENCE_SEED, synth.SMART_PRESETS["train"])
        fl, rep = train_failure(read_backblaze(smart_dir), seed=REFERENCE_SEED, version="1.0")
        report["failure"] = rep
        say(f"failure: {rep['rows']} drive-days, threshold {rep['threshold']:.3f}, "
            f"out-of-fold drive MCC {rep['oof_drive_mcc']:.3f}")
        os.makedirs(out_dir, exist_ok=True)
        for name, data in (("fail_slow.onnx", fs), ("failure.onnx", fl)):
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(data)
            say(f"wrote {os.path.join(out_dir, name)} ({len(data)} bytes)")
        if evaluate:
            held = os.path.join(tmp, "telemetry-heldout")
            say(f"generating held-out telemetry (preset heldout, seed {HELDOUT_SEED})")
            synth.make_telemetry(held, HELDOUT_SEED, synth.PRESETS["heldout"])
            report["heldout_fail_slow"] = evaluate_fail_slow(held, fs)
            hs = os.path.join(tmp, "smart-heldout")
            synth.make_smart(hs, HELDOUT_SEED, synth.SMART_PRESETS["heldout"])
            h = read_backblaze(hs)
            m = load_model_bytes(fl, "<failure>")
            scores = m.score(h.x.astype(np.float32)).astype(np.float64)
            report["heldout_failure"] = failure_drive_metrics(h, scores, m.threshold)
        report["seconds"] = round(time.monotonic() - t0, 1)
    return report


# ---- recorded telemetry: models and baselines on a held-out recording ----------------------

#: the three models compared on recorded telemetry, by what they were trained on
COMPARED = ("synthetic", "recorded", "recorded+synthetic")


def compare_recorded(rec_train: str, rec_heldout: str, seed: int = REFERENCE_SEED,
                     synthetic_seeds: Sequence[int] = (HELDOUT_SEED,),
                     save_dir: str | None = None, quiet: bool = False,
                     train_preset: str = "train", heldout_preset: str = "heldout"
                     ) -> dict[str, Any]:
    """Train three fail-slow models with ``seed`` - on the synthetic training
    set of the reference model (preset ``train``, seed 1: with ``seed`` 1 this
    is the packaged model, byte for byte), on the recording ``rec_train``, and
    on both - then score them and both baselines on the held-out recording and
    on synthetic held-out sets (preset ``heldout``, ``synthetic_seeds``).

    ``train_preset`` and ``heldout_preset`` name other :data:`ml.synth.PRESETS`
    (``small``: a quick run; the synthetic model is then not the packaged one).
    """
    say = _say(quiet)
    for preset in (train_preset, heldout_preset):
        if preset not in synth.PRESETS:
            raise TrainError(f"unknown synthetic preset {preset!r} (known: "
                             f"{', '.join(synth.PRESETS)})")
    if not synthetic_seeds:
        raise TrainError("give at least one synthetic held-out seed")
    rec = load_training_set(rec_train)
    held = load_training_set(rec_heldout)
    out: dict[str, Any] = {"seed": seed}
    with tempfile.TemporaryDirectory(prefix="ublkml-compare-") as tmp:
        say(f"generating synthetic telemetry (preset {train_preset} seed {REFERENCE_SEED}; "
            f"preset {heldout_preset} seeds {', '.join(map(str, synthetic_seeds))})")
        synth.make_telemetry(os.path.join(tmp, "train"), REFERENCE_SEED,
                             synth.PRESETS[train_preset])
        syn = load_training_set(os.path.join(tmp, "train"))
        syn_held = {}
        for s in synthetic_seeds:
            d = os.path.join(tmp, f"heldout-{s}")
            synth.make_telemetry(d, s, synth.PRESETS[heldout_preset])
            syn_held[s] = load_training_set(d)
    models: dict[str, bytes] = {}
    reports: dict[str, Any] = {}
    for name, base, extra in (("synthetic", syn, []), ("recorded", rec, []),
                              ("recorded+synthetic", syn, [rec])):
        say(f"training on {name} telemetry (seed {seed})")
        models[name], reports[name] = train_fail_slow(
            base.hosts, base.labels, seed, base.window_s,
            version="1.0" if name == "synthetic" else name.replace("+", "-"), extra=extra)
    with open(os.path.join(MODELS_DIR, "fail_slow.onnx"), "rb") as f:
        out["synthetic_is_packaged"] = models["synthetic"] == f.read()
    out["training"] = reports
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        for name, data in models.items():
            _write(os.path.join(save_dir, f"fail_slow-{name.replace('+', '-')}.onnx"), data)

    def sizes(ts: TrainingSet) -> dict[str, Any]:
        return {"hosts": len(ts.hosts), "drives": sum(len(h.disk_ids) for h in ts.hosts),
                "slow_drives": len(ts.labels), "window_s": ts.window_s}

    out["sets"] = {"recorded_train": sizes(rec), "recorded_heldout": sizes(held),
                   "synthetic_train": sizes(syn),
                   **{f"synthetic_heldout_{s}": sizes(ts) for s, ts in syn_held.items()}}
    for key, ts in (("recorded_heldout", held),
                    *((f"synthetic_heldout_{s}", t) for s, t in syn_held.items())):
        say(f"evaluating on {key}")
        res: dict[str, dict[str, float]] = {}
        for name, data in models.items():
            m = load_model_bytes(data, f"<{name}>")
            res[f"model:{name}"] = detect.metrics(
                detect.run("model", ts.hosts, m, ts.window_s), ts.labels)
        for method in ("peer2x", "perseus"):
            res[method] = detect.metrics(detect.run(method, ts.hosts), ts.labels)
        out[key] = res
    return out


def format_comparison(rep: dict[str, Any]) -> str:
    lines = [f"models trained with seed {rep['seed']}"
             + (" (model:synthetic is the packaged model)" if rep["synthetic_is_packaged"]
                else "")]
    for key, s in rep["sets"].items():
        if key not in rep:
            continue
        lines += [f"{key} ({s['hosts']} hosts, {s['drives']} drives, {s['slow_drives']} slow; "
                  f"window {s['window_s']:g} s)",
                  f"  {'method':<28} {'precision':>9} {'recall':>7} {'F1':>6} {'MCC':>6}"
                  "   tp/fp/fn/tn"]
        for name, m in rep[key].items():
            lines.append(f"  {name:<28} {m['precision']:9.3f} {m['recall']:7.3f} "
                         f"{m['f1']:6.3f} {m['mcc']:6.3f}   {m['tp']}/{m['fp']}/{m['fn']}/"
                         f"{m['tn']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml.train``: the same as ``ublkml ml train``."""
    from ublk_driver.core.cli import main as ublkml_main

    return ublkml_main(["ml", "train", *(sys.argv[1:] if argv is None else argv)])


@dataclass(frozen=True)
class TrainRequest:
    """``ublkml ml train``: what to train, from where, into which file."""

    what: str                      # one of TRAINABLE
    data_dir: str | None = None    # training data (not for reference)
    out: str | None = None         # the model file (reference: a directory)
    labels: str | None = None      # fail-slow: default DIR/labels.csv
    seed: int = 0
    window_s: float | None = None  # fail-slow: default from the tree
    add: tuple[str, ...] = ()      # fail-slow: more labelled trees
    horizon_days: int = HORIZON_DAYS
    version: str = "1"
    evaluate: bool = True          # reference: the held-out evaluation
    quiet: bool = False
    cv: int = DRIVE_FOLDS          # drive-fail-slow: folds by host
    loco: bool = False             # drive-fail-slow: also leave one cluster out
    self_baseline: bool = False    # drive-fail-slow: also judge drives by their first day

    def validate(self) -> None:
        if self.what not in TRAINABLE:
            raise TrainError(f"unknown model to train: {self.what!r}")
        if self.what != "reference" and not self.data_dir:
            raise TrainError(f"train {self.what} needs DIR")
        if self.what != "reference" and not self.out:
            raise TrainError(f"train {self.what} needs --out FILE")
        if self.add and self.what != "fail-slow":
            raise TrainError("--add is for train fail-slow")
        if (self.loco or self.self_baseline) and self.what != "drive-fail-slow":
            raise TrainError("--loco and --self-baseline are for train drive-fail-slow")


def train(req: TrainRequest) -> dict[str, Any]:
    """Train what ``req`` asks for and write the model; the training report."""
    req.validate()
    say = _say(req.quiet)
    if req.what == "reference":
        return reference(req.out or MODELS_DIR, quiet=req.quiet, evaluate=req.evaluate)
    assert req.data_dir is not None and req.out is not None
    def progress(i: int, n: int) -> None:
        if i == n or i % 10 == 0:
            say(f"read {i}/{n} hosts")

    if req.what == "drive-fail-slow":
        hosts = read_tree(req.data_dir, progress=progress)
        labels = req.labels or find_labels(req.data_dir)
        if labels is None:
            raise TrainError(f"{req.data_dir}: no labels.csv or slow_drive_info.csv; give "
                             "--labels CSV")
        data, report = train_drive_model(
            hosts, read_labels(labels), seed=req.seed,
            window_s=req.window_s or tree_window(req.data_dir) or detect.DEFAULT_WINDOW_S,
            folds=req.cv, loco=req.loco, self_baseline=req.self_baseline,
            version=req.version, quiet=req.quiet)
        report["na"] = {k: v for k, v in dropped_rows(hosts).items()
                        if k != "files_with_dropped"}
    elif req.what == "fail-slow":
        main_set = load_training_set(req.data_dir, req.labels, req.window_s, progress)
        extra = [load_training_set(d, progress=progress) for d in req.add]
        data, report = train_fail_slow(main_set.hosts, main_set.labels, seed=req.seed,
                                       window_s=main_set.window_s, version=req.version,
                                       extra=extra)
    else:
        h = read_backblaze(req.data_dir)
        data, report = train_failure(h, seed=req.seed, horizon_days=req.horizon_days,
                                     version=req.version)
    _write(req.out, data)
    report["path"] = req.out
    return report


def _write(path: str, data: bytes) -> None:
    if not path:
        raise TrainError("--out FILE is required")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
