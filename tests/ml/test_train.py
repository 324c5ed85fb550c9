"""Training is seeded (same data and seed: same bytes) and exports valid models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import skl2onnx  # type: ignore[import-untyped]  # noqa: F401  (extra "train"; `make setup` installs it, no silent skip)
from hypothesis import given, settings
from hypothesis import strategies as st

from ml import detect, synth
from ml.model import load_model, load_model_bytes
from ml.smart import read_backblaze
from ml.telemetry import read_labels, read_tree
from ml.train import (
    COMPARED,
    DRIVE_FEATURES,
    FAIL_SLOW_FEATURES,
    TrainError,
    best_mcc_threshold,
    compare_recorded,
    format_comparison,
    format_drive_report,
    host_folds,
    load_training_set,
    midpoint_threshold,
    train_drive_model,
    train_fail_slow,
    train_failure,
)
from tests.ml.helpers import ml_main


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = str(tmp_path_factory.mktemp("small"))
    synth.make_telemetry(d, 7, synth.PRESETS["small"])
    return d


def test_fail_slow_is_reproducible(small: str) -> None:
    hosts = read_tree(small)
    labels = read_labels(os.path.join(small, "labels.csv"))
    a, rep = train_fail_slow(hosts, labels, seed=3)
    b, _ = train_fail_slow(hosts, labels, seed=3)
    assert a == b
    m = load_model_bytes(a)
    assert m.kind == "fail_slow" and m.features == FAIL_SLOW_FEATURES
    assert m.threshold == pytest.approx(rep["threshold"], rel=1e-5)
    assert len(a) < 200_000


def test_labels_must_name_some_drives(small: str) -> None:
    with pytest.raises(TrainError, match="some, but not all"):
        train_fail_slow(read_tree(small), set(), seed=0)


def test_failure_model(tmp_path: Path) -> None:
    synth.make_smart(str(tmp_path), 4, synth.SMART_PRESETS["small"])
    h = read_backblaze(str(tmp_path))
    data, rep = train_failure(h, seed=1)
    m = load_model_bytes(data, expect_kind="failure")
    assert rep["positive_rows"] > 0 and 0 < m.threshold <= 1
    assert train_failure(h, seed=1)[0] == data


def test_best_threshold() -> None:
    s = np.array([0.1, 0.2, 0.8, 0.9])
    t, mcc = best_mcc_threshold(s, np.array([False, False, True, True]))
    assert mcc == 1.0 and 0.2 < t <= 0.8


def test_cli_train_and_validate(small: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert ml_main(["train", "fail-slow", small, "--out", str(out), "--seed", "1", "-q"]) == 0
    assert load_model(out).info.version == "1"
    assert ml_main(["train", "fail-slow", small]) == 1
    assert "--out" in capsys.readouterr().err


def test_train_with_a_recording_added(small: str, recorded_split: tuple[Path, Path],
                                      tmp_path: Path) -> None:
    """Generated telemetry (30-min windows) and a recording (30-s windows)
    train one model, each tree with its own window; reproducible."""
    rec = load_training_set(str(recorded_split[0]))
    assert rec.window_s == 30.0
    hosts, labels = read_tree(small), read_labels(os.path.join(small, "labels.csv"))
    alone, rep_alone = train_fail_slow(hosts, labels, seed=2)
    both, rep = train_fail_slow(hosts, labels, seed=2, extra=[rec])
    assert both == train_fail_slow(hosts, labels, seed=2, extra=[rec])[0] and both != alone
    assert [s["window_s"] for s in rep["sets"]] == [1800.0, 30.0]
    assert rep["drives"] == rep_alone["drives"] + sum(len(h.disk_ids) for h in rec.hosts)
    assert rep["slow_drives"] == rep_alone["slow_drives"] + len(rec.labels)
    out = tmp_path / "m.onnx"
    assert ml_main(["train", "fail-slow", small, "--add", str(recorded_split[0]),
                    "--out", str(out), "--seed", "2", "-q"]) == 0
    assert out.read_bytes() == both


def test_compare_recorded(recorded_split: tuple[Path, Path], tmp_path: Path) -> None:
    """The comparison's mechanics, on quick presets and the committed recording
    cut in two (the figures of docs/models.md come from the real presets)."""
    a, b = (str(p) for p in recorded_split)
    rep = compare_recorded(a, b, seed=1, synthetic_seeds=(2, 3), save_dir=str(tmp_path),
                           quiet=True, train_preset="small", heldout_preset="small")
    assert rep["synthetic_is_packaged"] is False          # preset small, not train
    assert list(rep["training"]) == list(COMPARED)
    assert set(rep["sets"]) == {"recorded_train", "recorded_heldout", "synthetic_train",
                                "synthetic_heldout_2", "synthetic_heldout_3"}
    held = load_training_set(b)
    assert rep["sets"]["recorded_heldout"] == {
        "hosts": len(held.hosts), "drives": sum(len(h.disk_ids) for h in held.hosts),
        "slow_drives": len(held.labels), "window_s": 30.0}
    methods = [f"model:{n}" for n in COMPARED] + ["peer2x", "perseus"]
    for key in ("recorded_heldout", "synthetic_heldout_2", "synthetic_heldout_3"):
        assert list(rep[key]) == methods
    # The figures are those of the saved models and the baselines, recomputed.
    for name in COMPARED:
        data = (tmp_path / f"fail_slow-{name.replace('+', '-')}.onnx").read_bytes()
        m = load_model_bytes(data)
        assert rep["recorded_heldout"][f"model:{name}"] == detect.metrics(
            detect.run("model", held.hosts, m, 30.0), held.labels)
    for method in ("peer2x", "perseus"):
        assert rep["recorded_heldout"][method] == detect.metrics(
            detect.run(method, held.hosts), held.labels)
    text = format_comparison(rep)
    assert "packaged" not in text and text.count("model:recorded+synthetic") == 3
    with pytest.raises(TrainError, match="unknown synthetic preset"):
        compare_recorded(a, b, train_preset="nope", quiet=True)
    with pytest.raises(TrainError, match="at least one"):
        compare_recorded(a, b, synthetic_seeds=(), quiet=True)


# ---- the drive model (real fleet layout) ----------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated telemetry (12 hosts) laid out as the published fleet data:
    DIR/<cluster>/<host>/<day>.csv and a slow_drive_info.csv with its trailing
    comma.  Generated, not real: for the mechanics (folds, nesting, report,
    reproducibility), not for figures."""
    src = tmp_path_factory.mktemp("flat")
    synth.make_telemetry(str(src), 5, synth.config_from("small", hosts=12))
    out = tmp_path_factory.mktemp("fleet")
    hosts = sorted(p.name for p in src.iterdir() if p.is_dir())
    where = {h: f"cluster_{'AB'[i % 2]}" for i, h in enumerate(hosts)}
    for h in hosts:
        (out / where[h]).mkdir(exist_ok=True)
        shutil.copytree(src / h, out / where[h] / h)
    labels = read_labels(str(src / "labels.csv"))
    (out / "slow_drive_info.csv").write_text("cluster,host_name,workload,disk_id,\r\n" + "".join(
        f"{where[h]},{h},block,{d},\r\n" for h, d in sorted(labels)))
    return out


def test_drive_model_cross_validation_and_reproducibility(fleet: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    hosts = read_tree(str(fleet))
    labels = read_labels(str(fleet / "slow_drive_info.csv"))
    assert {h.host.split("/")[0] for h in hosts} == {"cluster_A", "cluster_B"}
    assert labels and labels <= {(h.host, d) for h in hosts for d in h.disk_ids}
    data, rep = train_drive_model(hosts, labels, seed=3, folds=2, loco=True)
    m = load_model_bytes(data, expect_kind="fail_slow")
    assert m.features == DRIVE_FEATURES and detect.drive_quantile(m) == 0.5
    assert m.threshold == pytest.approx(rep["threshold"], rel=1e-5)
    cv = rep["cv"]["metrics"]
    assert list(cv) == ["model", "peer2x", "perseus"]
    for per in (*cv.values(), *rep["leave_one_cluster_out"].values()):
        assert list(per) == ["all", "cluster_A", "cluster_B"]
        assert sum(per["all"][k] for k in ("tp", "fp", "fn", "tn")) == rep["drives"]
        assert per["all"]["tp"] + per["all"]["fn"] == len(labels)
        assert per["all"]["tp"] == per["cluster_A"]["tp"] + per["cluster_B"]["tp"]
    # the baselines' rows are those of detect, recomputed
    assert cv["peer2x"]["all"] == detect.metrics(detect.run("peer2x", hosts), labels)
    out = tmp_path / "drive.onnx"                          # reproducible, through the CLI
    assert ml_main(["train", "drive-fail-slow", str(fleet), "--cv", "2", "--loco", "--seed",
                    "3", "--out", str(out), "--json"]) == 0
    assert out.read_bytes() == data
    res = json.loads(capsys.readouterr().out)
    assert res["sha256"] == rep["sha256"] and res["cv"]["metrics"] == cv
    text = format_drive_report(rep)
    assert "2-fold cross-validation by host" in text and "leave one cluster out" in text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ABC"), st.booleans()), min_size=1, max_size=40),
       st.integers(2, 6), st.integers(0, 100))
def test_host_folds_keep_hosts_whole_and_spread_slow_hosts(
        hosts: list[tuple[str, bool]], k: int, seed: int) -> None:
    names = [f"cluster_{c}/host_{i}" for i, (c, _) in enumerate(hosts)]
    slow = {n for n, (_, s) in zip(names, hosts, strict=True) if s}
    fold = host_folds(names, slow, k, seed)
    assert fold.shape == (len(names),) and set(fold.tolist()) <= set(range(k))
    per = np.bincount([f for n, f in zip(names, fold, strict=True) if n in slow], minlength=k)
    assert per.max() - per.min() <= 1          # slow hosts dealt evenly
    assert (host_folds(names, slow, k, seed) == fold).all()


def test_midpoint_threshold() -> None:
    s = np.array([0.1, 0.2, 0.8, 0.9])
    t, mcc = midpoint_threshold(s, np.array([False, False, True, True]))
    assert mcc == 1.0 and t == pytest.approx(0.5)
    t, _ = midpoint_threshold(np.array([0.3, 0.3]), np.array([True, False]))
    assert 0 < t <= 1
