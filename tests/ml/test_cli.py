"""`ublkml model ...` and `ublkml ml ...` entry points: outputs, errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ml.model import DRIVE_MODEL, REFERENCE_MODELS
from tests.ml.helpers import ml_main, model_main, sigmoid_model
from ublk_driver.core.cli import main


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "state"
    monkeypatch.setenv("UBLKML_STATE_DIR", str(d))
    return d


def test_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert model_main(["validate", REFERENCE_MODELS["fail_slow"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] and out["kind"] == "fail_slow"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert model_main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ublkml: error: ") and str(bad) in err[0]
    assert model_main(["validate", REFERENCE_MODELS["failure"], "--kind", "fail_slow"]) == 1


def test_use_and_list(tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "m.onnx"
    good.write_bytes(sigmoid_model())
    assert model_main(["use", str(good)]) == 1          # no device: which one?
    assert "-n DEV" in capsys.readouterr().err
    state.mkdir()
    (state / "3.json").write_text("{}")
    assert model_main(["use", str(good), "--json"]) == 0  # the only device
    assert json.loads(capsys.readouterr().out)["dev_id"] == 3
    assert (state / "3.model").read_text().strip() == str(good)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(sigmoid_model({"ublkml.kind": "fail_slow"}))
    assert model_main(["use", str(bad), "-n", "3"]) == 1  # validated before it is handed over
    assert (state / "3.model").read_text().strip() == str(good)
    capsys.readouterr()
    assert model_main(["list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["kind"] for m in out["models"]} == {"fail_slow", "failure"}
    assert out["devices"] == [{"dev_id": 3, "model": str(good)}]


def test_list_shows_the_drive_model_and_what_each_is_for(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert model_main(["list", "--json"]) == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(models) == {"fail_slow", "drive_fail_slow", "failure"}
    drive = models["drive_fail_slow"]
    assert "error" not in drive and drive["path"] == DRIVE_MODEL
    assert drive["kind"] == "fail_slow" and "fit_lat_ratio_p50" in drive["features"]
    assert "ml detect" in drive["for"] and "monitor" in drive["for"]
    assert "not for the in-server scorer" in drive["for"]
    assert "in-server scorer" in models["fail_slow"]["for"]
    assert "SMART" in models["failure"]["for"]
    assert model_main(["list"]) == 0
    text = capsys.readouterr().out
    assert f"packaged drive_fail_slow: {DRIVE_MODEL}" in text
    assert text.count("  for: ") == 3 and "devices use the packaged fail_slow model" in text


def test_use_refuses_a_model_the_scorer_cannot_feed(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state.mkdir()
    (state / "3.model").write_text(REFERENCE_MODELS["fail_slow"] + "\n")
    assert model_main(["use", DRIVE_MODEL, "-n", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ublkml: error: ")
    assert "fit_lat_ratio_p10, fit_lat_ratio_p50, fit_lat_ratio_p90" in err[0]
    assert REFERENCE_MODELS["fail_slow"] in err[0]           # which model to use instead
    assert (state / "3.model").read_text().strip() == REFERENCE_MODELS["fail_slow"]


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert model_main([]) == 2
    assert model_main(["frobnicate"]) == 2
    assert ml_main(["detect"]) == 2
    assert "DIR" in capsys.readouterr().err
    assert ml_main(["detect", "--help"]) == 0
    assert "host,disk_id,flagged,score" in capsys.readouterr().out
    assert main(["model", "validate", "--help"]) == 0


def test_synth_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ml_main(["synth", "telemetry", str(tmp_path / "t"), "--preset", "small",
                    "--hosts", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hosts"] == 2 and (tmp_path / "t" / "labels.csv").exists()
    assert ml_main(["synth", "smart", str(tmp_path / "s"), "--preset", "small", "-q"]) == 0


def test_python_dash_m() -> None:
    p = subprocess.run([sys.executable, "-m", "ml", "model", "validate",
                        REFERENCE_MODELS["failure"]], capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0 and "kind failure" in p.stdout


def test_compare_refuses_bad_arguments(recorded_split: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    a, b = (str(p) for p in recorded_split)
    assert ml_main(["compare", a, b, "--synthetic-seeds", "2,x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--synthetic-seeds '2,x'" in err and len(err.splitlines()) == 1
    assert ml_main(["compare", a, str(tmp_path / "missing")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
