"""Training is seeded (same data and seed: same bytes) and exports valid models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import skl2onnx  # noqa: F401  (extra "train"; `make setup` installs it, no silent skip)

from ml import synth
from ml.cli import ml_main
from ml.model import load_model, load_model_bytes
from ml.smart import read_backblaze
from ml.telemetry import read_labels, read_tree
from ml.train import (
    FAIL_SLOW_FEATURES,
    TrainError,
    best_mcc_threshold,
    train_fail_slow,
    train_failure,
)


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
