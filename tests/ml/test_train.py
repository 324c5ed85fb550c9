"""Training is seeded (same data and seed: same bytes) and exports valid models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import skl2onnx  # type: ignore[import-untyped]  # noqa: F401  (extra "train"; `make setup` installs it, no silent skip)

from ml import detect, synth
from ml.model import load_model, load_model_bytes
from ml.smart import read_backblaze
from ml.telemetry import read_labels, read_tree
from ml.train import (
    COMPARED,
    FAIL_SLOW_FEATURES,
    TrainError,
    best_mcc_threshold,
    compare_recorded,
    format_comparison,
    load_training_set,
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
