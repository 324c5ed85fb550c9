"""The ONNX contract: good models load and score; bad ones get one clear ModelError."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from ml.model import (
    DRIVE_MODEL,
    REFERENCE_MODELS,
    ModelError,
    load_model,
    load_model_bytes,
    parse_metadata,
)
from ml.train import FAIL_SLOW_MONOTONE
from tests.ml.helpers import GOOD_META, sigmoid_model
from ublk_driver.core.errors import UblkError


def write(tmp_path: Path, data: bytes, name: str = "m.onnx") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_error_class() -> None:
    assert issubclass(ModelError, UblkError) and issubclass(ModelError, ValueError)


@pytest.mark.parametrize("kind", ["fail_slow", "failure"])
def test_reference_models_load_and_are_small(kind: str) -> None:
    path = REFERENCE_MODELS[kind]
    assert os.path.getsize(path) < 200_000
    m = load_model(path, expect_kind=kind)
    assert m.kind == kind and 0 < m.threshold <= 1 and m.info.version
    s, f = m.predict(np.zeros((5, len(m.features)), dtype=np.float32))
    assert s.shape == (5,) and f.dtype == np.bool_ and np.all((s >= 0) & (s <= 1))


def test_fail_slow_reference_separates_slow_from_healthy() -> None:
    m = load_model(REFERENCE_MODELS["fail_slow"])
    healthy = np.ones((1, len(m.features)), dtype=np.float32)
    slow = healthy.copy()
    for i, n in enumerate(m.features):
        if n != "peer_tput_ratio":
            slow[0, i] = 4.0
    s, f = m.predict(np.vstack([healthy, slow]))
    assert not f[0] and f[1] and s[1] > s[0]


def test_hand_made_model(tmp_path: Path) -> None:
    m = load_model(write(tmp_path, sigmoid_model()))
    assert m.features == ("peer_lat_ratio", "peer_p99_ratio")
    s, f = m.predict(np.array([[1, 1], [3, 3]], dtype=np.float32))
    np.testing.assert_allclose(s, [0.5, 1 / (1 + np.exp(-4))], rtol=1e-6)
    assert list(f) == [True, True]
    # [N] output works too
    m = load_model_bytes(sigmoid_model(out_shape=["N"]))
    assert m.score(np.zeros((3, 2), dtype=np.float32)).shape == (3,)


def test_sklearn_classifier_without_zipmap() -> None:
    from sklearn.linear_model import LogisticRegression

    from ml.train import export_onnx

    x = np.random.default_rng(0).random((200, 2)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(int)
    data = export_onnx(LogisticRegression().fit(x, y), ["peer_lat_ratio", "lat_cv"],
                       "fail_slow", "probability of class 1", 0.5, "3")
    m = load_model_bytes(data)
    assert m.info.score_output == "probabilities" and m.info.score_column == 1
    s = m.score(np.array([[0.9, 0.5], [0.1, 0.5]], dtype=np.float32))
    assert s[0] > 0.5 > s[1]


def test_sklearn_zipmap_output_is_refused() -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).random((50, 2)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int))
    proto = to_onnx(clf, initial_types=[("input", FloatTensorType([None, 2]))],
                    target_opset={"": 17, "ai.onnx.ml": 3})
    for k, v in {**GOOD_META, "ublkml.features": "lat_cv,iops"}.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    with pytest.raises(ModelError, match="zipmap"):
        load_model_bytes(proto.SerializeToString())


BAD = [
    ("empty", lambda: b"", "empty file"),
    ("garbage", lambda: b"\x00\x01hello, not a model" * 10, "not an ONNX model|cannot load"),
    ("no metadata", lambda: sigmoid_model(meta=None), "lacks ublkml.kind"),
    ("bad kind", lambda: sigmoid_model({**GOOD_META, "ublkml.kind": "fast"}), "ublkml.kind"),
    ("unknown feature", lambda: sigmoid_model({**GOOD_META,
                                               "ublkml.features": "peer_lat_ratio,vibes"}),
     "unknown feature.*vibes"),
    ("empty feature", lambda: sigmoid_model({**GOOD_META, "ublkml.features": "peer_lat_ratio,"}),
     "comma-separated"),
    ("duplicate", lambda: sigmoid_model({**GOOD_META,
                                         "ublkml.features": "lat_cv,lat_cv"}), "twice"),
    ("smart in fail_slow", lambda: sigmoid_model({**GOOD_META,
                                                  "ublkml.features": "smart_5_raw,lat_cv"}),
     "cannot use smart_5_raw"),
    ("threshold text", lambda: sigmoid_model({**GOOD_META, "ublkml.threshold": "high"}),
     "must be a number"),
    ("threshold range", lambda: sigmoid_model({**GOOD_META, "ublkml.threshold": "1.5"}),
     r"\(0, 1\]"),
    ("threshold nan", lambda: sigmoid_model({**GOOD_META, "ublkml.threshold": "nan"}),
     r"\(0, 1\]"),
    ("version", lambda: sigmoid_model({**GOOD_META, "ublkml.version": "one two"}),
     "ublkml.version"),
    ("no output text", lambda: sigmoid_model({**GOOD_META, "ublkml.output": " "}),
     "ublkml.output"),
    ("too few columns", lambda: sigmoid_model(n_features=3), r"shape \[N, 2\]"),
    ("fixed batch", lambda: sigmoid_model(batch=4), "N dynamic"),
    ("double input", lambda: sigmoid_model(in_type=TensorProto.DOUBLE), "must be float32"),
    ("wide output", lambda: sigmoid_model(out_shape=["N", 3]), r"\[N\], \[N, 1\] or \[N, 2\]"),
    ("raw scores", lambda: sigmoid_model(raw=True), r"outside \[0, 1\]"),
]


@pytest.mark.parametrize("name,make,message", BAD, ids=[b[0] for b in BAD])
def test_bad_models_are_refused(tmp_path: Path, name: str, make, message: str) -> None:
    path = write(tmp_path, make())
    with pytest.raises(ModelError, match=message) as e:
        load_model(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(path)


def test_missing_file_and_wrong_kind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="fail_slow model, failure expected"):
        load_model(write(tmp_path, sigmoid_model()), expect_kind="failure")


def test_without_the_onnx_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh install has onnxruntime only: validation still refuses bad models."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    assert load_model(REFERENCE_MODELS["fail_slow"]).kind == "fail_slow"
    with pytest.raises(ModelError, match="cannot load"):
        load_model(write(tmp_path, b"garbage" * 20))
    with pytest.raises(ModelError, match="unknown feature"):
        load_model(write(tmp_path, sigmoid_model({**GOOD_META, "ublkml.features": "x,y"})))


def test_scoring_checks_its_input() -> None:
    m = load_model_bytes(sigmoid_model())
    with pytest.raises(ModelError, match=r"input must be \[N, 2\]"):
        m.score(np.zeros((2, 3), dtype=np.float32))
    assert m.score(np.zeros((0, 2), dtype=np.float32)).shape == (0,)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["ublkml.kind", "ublkml.features", "ublkml.output",
                                        "ublkml.threshold", "ublkml.version", "other"]),
                       st.text(max_size=40)))
def test_metadata_parsing_fails_only_with_model_error(meta: dict[str, str]) -> None:
    try:
        kind, names, _, threshold, _ = parse_metadata(meta, "m.onnx")
    except ModelError as e:
        assert str(e).startswith("m.onnx: ")
    else:
        assert kind in ("fail_slow", "failure") and names and 0 < threshold <= 1


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(REFERENCE_MODELS)), st.integers(0, 2**32 - 1),
       st.sampled_from([1.0, 100.0, 1e6, 1e9]))
def test_reference_models_score_any_sane_input(kind: str, seed: int, scale: float) -> None:
    """No input in the features' ranges may give NaN (a float32 overflow in a tree once did)."""
    m = load_model(REFERENCE_MODELS[kind])
    rng = np.random.default_rng(seed)
    x = (rng.random((64, len(m.features))) * scale).astype(np.float32)
    s = m.score(x)  # raises ModelError on NaN or out of [0, 1]
    assert s.shape == (64,)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([REFERENCE_MODELS["fail_slow"], DRIVE_MODEL]), st.integers(0, 2**32 - 1))
def test_fail_slow_models_are_monotone(path: str, seed: int) -> None:
    """More latency than the peers never lowers a packaged fail-slow score, more
    throughput never raises it: a healthy drive whose ratios fall because a peer
    turned slow cannot be flagged for it."""
    m = load_model(path, expect_kind="fail_slow")
    rng = np.random.default_rng(seed)
    x = (rng.random((32, len(m.features))) * rng.choice([1.5, 4.0, 40.0])).astype(np.float32)
    base = m.score(x)
    for i, name in enumerate(m.features):
        up = x.copy()
        up[:, i] += (rng.random(32) * 3).astype(np.float32)
        moved = (m.score(up) - base) * FAIL_SLOW_MONOTONE[name]
        assert np.all(moved >= 0), (name, x[moved < 0], base[moved < 0])
