"""The scorer: per-path windows, batched scoring, hooks, hot swap, never dying."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from ml.bench_scoring import measure
from ml.features import summarize
from ml.model import DRIVE_MODEL, REFERENCE_MODELS, ModelError, drive_model
from ml.scorer import Scorer, model_file, verdicts_file
from tests.ml.helpers import GOOD_META, batch, sigmoid_model
from ublk_driver.core.cli import main
from ublk_driver.records import COMPLETION_DTYPE, SUMMARY_DTYPE


class Source:
    """Hands out queued batches, then nothing (like an idle device)."""

    def __init__(self, *batches: np.ndarray) -> None:
        self.batches = list(batches)

    def read_completions(self, max_per_queue: int = 65536) -> np.ndarray:
        return self.batches.pop(0) if self.batches else np.zeros(0, COMPLETION_DTYPE)


def test_slow_leg_is_flagged_and_hooks_run() -> None:
    seen: list[tuple[int, float, bool]] = []
    tapped: list[int] = []
    src = Source(*(batch(3000, paths=3, slow_path=1, factor=5.0, seed=i) for i in range(3)))
    sc = Scorer(src, on_verdict=lambda p, s, f: seen.append((p, s, f)),
                on_records=lambda r: tapped.append(len(r)))
    for _ in range(4):
        sc.tick()
    v = sc.verdicts()
    assert set(v) == {0, 1, 2}
    assert v[1].flagged and not v[0].flagged and not v[2].flagged
    assert v[1].score > v[0].score
    assert sum(x.completions for x in v.values()) == 9000   # all three ticks in the window
    assert v[1].features["peer_lat_ratio"] > 3
    assert sc.consumed == 9000 and tapped == [3000] * 3
    assert {p for p, _, _ in seen} == {0, 1, 2}
    assert sc.stats()["scoring_ns_per_completion"] > 0


class CountingSource(Source):
    """The engine's per-path counts (``Server.read_summaries``), made here by
    adding up the same batches in Python: a stand-in for the queue threads
    (whose counting tests/ublk_driver/test_summaries.py checks)."""

    def __init__(self, *batches: np.ndarray) -> None:
        super().__init__(*batches)
        self.total = np.zeros(8, dtype=SUMMARY_DTYPE)
        self.record_reads = 0

    def read_completions(self, max_per_queue: int = 65536) -> np.ndarray:
        self.record_reads += 1
        return np.zeros(0, COMPLETION_DTYPE)

    def read_summaries(self) -> np.ndarray:
        if self.batches:
            s = summarize(self.batches.pop(0))
            k = s.n_paths
            self.total["n"][:k] += s.n.astype(np.uint64)
            self.total["errors"][:k] += s.errors.astype(np.uint64)
            self.total["bytes"][:k] += s.bytes.astype(np.uint64)
            self.total["lat_sum"][:k] += s.lat_sum.astype(np.uint64)
            self.total["lat_sumsq"][:k] += s.lat_sumsq
            self.total["hist"][:k] += s.hist.astype(np.uint64)
        return self.total.copy()


def test_summaries_give_the_same_verdicts_as_records() -> None:
    batches = [batch(3000, paths=3, slow_path=1, factor=5.0, seed=i) for i in range(3)]
    by_records = Scorer(Source(*batches))
    src = CountingSource(*batches)
    by_counts = Scorer(src)
    for _ in range(4):
        by_records.tick()
        by_counts.tick()
    a, b = by_records.verdicts(), by_counts.verdicts()
    assert set(a) == set(b) == {0, 1, 2}
    for p in a:
        assert (a[p].flagged, a[p].completions) == (b[p].flagged, b[p].completions)
        assert a[p].score == pytest.approx(b[p].score, rel=1e-4)
    assert by_counts.consumed == 9000
    assert src.record_reads == 0  # no records drained without an on_records hook


def test_window_slides() -> None:
    src = Source(*(batch(100, seed=i) for i in range(5)))
    sc = Scorer(src, window_ticks=2, min_completions=1)
    for _ in range(5):
        sc.tick()
    assert sc.verdicts()[0].completions == 200
    sc.tick()
    assert sc.verdicts()[0].completions == 100  # only the last batch is left in the window


def test_late_ticks_do_not_stretch_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ticks 0.4 s apart (a starved machine): the window keeps about 1 s, not 10 ticks."""
    clock = [100.0]
    monkeypatch.setattr("ml.scorer.time.monotonic", lambda: clock[0])
    src = Source(*(batch(100, seed=i) for i in range(8)))
    sc = Scorer(src, min_completions=1)       # 10 ticks of 0.1 s: window_s = 1 s
    sc._last_tick = clock[0]
    for _ in range(8):
        clock[0] += 0.4
        sc.tick()
    v = sc.verdicts()[0]
    assert v.completions == 300 and v.window_s == pytest.approx(1.2)   # 3 ticks
    for _ in range(3):                       # on time again: up to 10 ticks, 1 s
        clock[0] += 0.1
        sc.tick()
    assert sc.verdicts() and len(sc._ring) <= 10


def test_swap_model_validates_first(tmp_path: Path) -> None:
    sc = Scorer(Source())
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(ModelError):
        sc.swap_model(str(bad))
    assert sc.model.info.path == REFERENCE_MODELS["fail_slow"]
    good = tmp_path / "good.onnx"
    good.write_bytes(sigmoid_model())
    assert sc.swap_model(str(good)).info.version == "0.1"
    assert sc.model.info.path == str(good)
    failure = REFERENCE_MODELS["failure"]
    with pytest.raises(ModelError, match="failure model, fail_slow expected"):
        sc.swap_model(failure)


def test_hot_swap_through_the_state_file(tmp_path: Path) -> None:
    src = Source(*(batch(500, seed=i) for i in range(10)))
    sc = Scorer(src, dev_id=7, directory=str(tmp_path), state_interval_s=0)
    good = tmp_path / "good.onnx"
    good.write_bytes(sigmoid_model({**GOOD_META, "ublkml.version": "9"}))
    Path(model_file(7, str(tmp_path))).write_text(f"{good}\n")
    sc.tick()
    assert sc.model.info.version == "9" and sc.verdicts()[0].model_version == "9"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(sigmoid_model({**GOOD_META, "ublkml.features": "bogus"}))
    Path(model_file(7, str(tmp_path))).write_text(f"{bad}\n")
    os.utime(model_file(7, str(tmp_path)), (time.time() + 5, time.time() + 5))
    sc.tick()  # refused: logged, kept the old model, the tick still scored
    assert sc.model.info.version == "9" and sc.errors == 1
    state = json.loads(Path(verdicts_file(7, str(tmp_path))).read_text())
    assert "unknown feature" in state["model_error"]
    assert state["verdicts"][0]["path"] == 0 and state["model"]["version"] == "9"


def test_refuses_a_model_needing_features_summaries_lack(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """At start: the packaged drive model (fit_* features) as a path, as a Model, and
    through `ublkml add --score`, which refuses it before any device exists."""
    for model in (DRIVE_MODEL, drive_model()):
        with pytest.raises(ModelError) as e:
            Scorer(Source(), model)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{DRIVE_MODEL}: needs fit_lat_ratio_p10, "
                                                    "fit_lat_ratio_p50, fit_lat_ratio_p90,")
        assert REFERENCE_MODELS["fail_slow"] in msg
    mixed = tmp_path / "mixed.onnx"   # one fit_* feature among per-path ones
    mixed.write_bytes(sigmoid_model(
        {**GOOD_META, "ublkml.features": "peer_lat_ratio,fit_lat_ratio_p50"}))
    with pytest.raises(ModelError, match=r"needs fit_lat_ratio_p50, which"):
        Scorer(Source(), str(mixed))
    assert main(["add", "-t", "null", "--score", DRIVE_MODEL]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs fit_lat_ratio_p10" in err[0]


def test_hot_swap_refuses_a_drive_model_and_keeps_the_old_one(tmp_path: Path) -> None:
    src = Source(*(batch(500, seed=i) for i in range(10)))
    sc = Scorer(src, dev_id=7, directory=str(tmp_path), state_interval_s=0)
    with pytest.raises(ModelError, match="per-path summaries do not have"):
        sc.swap_model(DRIVE_MODEL)
    assert sc.model.info.path == REFERENCE_MODELS["fail_slow"]
    Path(model_file(7, str(tmp_path))).write_text(f"{DRIVE_MODEL}\n")
    sc.tick()  # refused: logged, old model kept, the tick still scored
    assert sc.model.info.path == REFERENCE_MODELS["fail_slow"] and sc.errors == 1
    state = json.loads(Path(verdicts_file(7, str(tmp_path))).read_text())
    assert "fit_lat_ratio_p10" in state["model_error"]
    assert state["model"]["path"] == REFERENCE_MODELS["fail_slow"]
    assert state["verdicts"][0]["path"] == 0


def test_errors_never_stop_it(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        calls = 0

        def read_completions(self, max_per_queue: int = 65536) -> np.ndarray:
            self.calls += 1
            if self.calls % 2:
                raise OSError(5, "ring gone")
            return batch(100)

    def bad_hook(p: int, s: float, f: bool) -> None:
        raise RuntimeError("hook bug")

    src = Broken()
    with Scorer(src, interval_s=0.01, min_completions=1, on_verdict=bad_hook) as sc:
        deadline = time.monotonic() + 5
        while src.calls < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert src.calls >= 10 and sc.errors >= 8
    assert 0 in sc.verdicts()
    assert "ring gone" in caplog.text and "hook bug" in caplog.text


def test_cost_is_under_a_microsecond_per_completion() -> None:
    r = measure(16384, paths=2, ticks=20, runs=3)
    assert r["ns_per_completion"] < 1000, r
