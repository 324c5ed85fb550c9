"""The fail-slow runner's pure parts: fio job, latency log, phases, timeline, goals, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.failslow import (
    QUICK,
    Plan,
    compare,
    fio_job,
    goals,
    latency_bins,
    margin,
    phase_stats,
    read_lat_log,
    timeline,
    write_report,
)


def test_fio_job_verifies_writes_and_logs_reads() -> None:
    job = fio_job("/dev/ublkb9", 30, Plan(), "/tmp/x/run", bursty=False)
    assert "filename=/dev/ublkb9" in job and "runtime=30" in job
    assert "verify=crc32c" in job and "verify_backlog=64" in job and "verify_fatal=1" in job
    assert "write_lat_log=/tmp/x/run" in job and "log_unix_epoch=1" in job
    bursty = fio_job("/dev/ublkb9", 60, Plan(), "/tmp/x/h", bursty=True)
    assert "thinktime=" in bursty and "rw=randrw" in bursty and "verify=crc32c" in bursty
    # fio itself accepts both (parse only).
    for text in (job, bursty):
        path = Path("/tmp") / f"failslow-test-{hash(text) & 0xffff}.fio"
        path.write_text(text)
        proc = subprocess.run(["fio", "--parse-only", str(path)], capture_output=True,
                              text=True)
        path.unlink()
        assert proc.returncode == 0, proc.stderr


def test_lat_log_reads_only_in_seconds_and_us(tmp_path: Path) -> None:
    log = tmp_path / "run_clat.1.log"
    log.write_text("1700000000000, 120000, 0, 4096, 0\n"
                   "1700000000100, 999000, 1, 4096, 0\n"
                   "1700000000200, 130000, 0, 4096, 4096\n")
    lat = read_lat_log(log)
    assert lat.shape == (2, 2)
    assert lat[0, 0] == pytest.approx(1.7e9) and lat[0, 1] == pytest.approx(120.0)


def _lat() -> np.ndarray:
    t = np.arange(0, 30, 0.01)
    lat = np.where((t >= 10) & (t < 12), 1000.0, 100.0)
    return np.stack([t + 1000, lat], axis=1)


def test_phases_and_bins() -> None:
    lat = _lat()
    ph = phase_stats(lat, {"before": (1000, 1010), "during": (1010, 1012),
                           "after": (1012.5, 1030), "none": (None, 1030)}, window_s=5)
    assert ph["before"]["p99_us"] == 100.0 and ph["during"]["p50_us"] == 1000.0
    assert ph["after"]["n"] == 1750 and ph["none"]["n"] == 0
    # whole windows only; a phase shorter than one window is one window
    assert [w["start"] for w in ph["before"]["windows"]] == [1000, 1005]
    assert len(ph["after"]["windows"]) == 3 and len(ph["during"]["windows"]) == 1
    assert ph["during"]["median_p99_us"] == 1000.0 and ph["none"]["median_p99_us"] is None
    bins = latency_bins(lat, 1000.0)
    assert len(bins["t"]) == 120 and max(bins["max"]) == 1000.0


def test_timeline_from_the_legs_log() -> None:
    ev = [{"t": 5.0, "event": "request", "leg": 1, "action": "demote_leg"},   # before onset
          {"t": 11.0, "event": "request", "leg": 1, "action": "demote_leg"},
          {"t": 11.2, "event": "answer", "leg": 1, "action": "demote_leg", "status": "applied"},
          {"t": 11.3, "event": "state", "leg": 1, "old": "demoted", "new": "demoted"},
          {"t": 30.0, "event": "state", "leg": 1, "old": "promoting", "new": "active"}]
    tl = timeline(ev, 1, onset=10.0, cleared=20.0)
    assert tl == {"detected": 11.0, "demoted": 11.2, "readmitted": 30.0}
    assert timeline(ev, 0, 10.0, None)["readmitted"] is None


def test_compare_uses_median_windows_and_reports_the_noise() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(0, 60, 0.002)
    lat = rng.lognormal(np.log(100), 0.3, t.size)
    lat[(t >= 20) & (t < 40)] *= 1.2                       # demoted: 1.2x slower
    lat[(t >= 5) & (t < 5.3)] = 50_000                       # one stall in a healthy window
    data = np.stack([t + 1000, lat], axis=1)
    ph = phase_stats(data, {"before": (1000, 1020), "during": (1020, 1020),
                            "after_demotion": (1020, 1040),
                            "after_readmission": (1040, 1060)}, window_s=5)
    c = compare(ph)
    assert c["healthy_windows"] == 8 and c["demoted_windows"] == 4
    assert c["p99_ratio"] == pytest.approx(1.2, abs=0.1)  # the stall moved one window only
    assert c["noise_p99_ratio"] == pytest.approx(1.0, abs=0.1)
    assert ph["before"]["p99_us"] > 10 * ph["before"]["median_p99_us"]  # pooled: it did not


def test_margin_from_score_lines() -> None:
    ev = [{"t": 1.0, "event": "score", "leg": 0, "max": 0.2, "flagged": 0, "ticks": 10,
           "streak": 0},
          {"t": 1.0, "event": "score", "leg": 1, "max": 0.6, "flagged": 2, "ticks": 10,
           "streak": 2},
          {"t": 2.0, "event": "probe", "leg": 1}]
    m = margin(ev, 60)
    assert m["ticks"] == 20 and m["flagged_ticks"] == 2 and m["max_streak"] == 2
    assert m["max_score"] == 0.6 and m["seconds_logged"] == 1
    assert margin([], 60)["max_streak"] is None


def _doc() -> dict[str, object]:
    lat = _lat()
    phases = phase_stats(lat, {"before": (1000, 1010), "during": (1010, 1012),
                               "after_demotion": (1012.5, 1020),
                               "after_readmission": (1021, 1030)}, window_s=2)
    doc: dict[str, object] = {
        "meta": {"kernel": "6.12", "in_vm": True, "filesystem": "ext4",
                 "agent_source": "ebpf", "started": "now", "plan": json.loads(
                     json.dumps(QUICK.__dict__)), "legs_identical": True},
        "run": {"t0": 1000.0, "onset": 1010.0, "demoted": 1012.0, "cleared": 1020.0,
                "readmitted": 1021.0, "detect_s": 1.8, "demote_s": 2.0,
                "readmit_after_clear_s": 1.0, "phases": phases, "compare": compare(phases),
                "bins": latency_bins(lat, 1000.0)}}
    doc["goals"] = goals(doc)
    return doc


def test_goals_and_report(tmp_path: Path) -> None:
    doc = _doc()
    g = doc["goals"]
    assert isinstance(g, dict)
    assert g["detect_and_demote_within_3s"]["met"]
    assert g["p99_after_demotion_vs_healthy"]["value"] == 1.0
    assert all(v["met"] for v in g.values())
    report = write_report(doc, tmp_path).read_text()
    assert "demoted **2.0 s**" in report and "| fault, leg demoted |" in report
    assert "**x1.0** the healthy" in report
    assert (tmp_path / "latency.png").stat().st_size > 10_000


def test_cli_help_and_usage_errors() -> None:
    run = [sys.executable, "-m", "ublk_driver", "demo"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--healthy-minutes" in out.stdout
    bad = subprocess.run([*run, "--slow", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    via = subprocess.run([sys.executable, "-m", "ublk_driver", "demo", "failslow", "--help"],
                         capture_output=True, text=True)
    assert via.returncode == 0 and "fail-slow demonstration" in via.stdout
