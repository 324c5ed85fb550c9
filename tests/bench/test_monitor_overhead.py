"""bench.monitor_overhead: the round order and arithmetic (pure), and one real short run
(a kernel loop device in RAM, fio, the real monitor with eBPF) on this host as root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.monitor_overhead import abba, summarize
from bench.runner import BenchError
from kernel_agent.accounting import bpf_unavailable_reason

REPO = Path(__file__).resolve().parents[2]


@given(st.integers(min_value=1, max_value=40))
def test_abba_balances_the_sides(rounds: int) -> None:
    plan = abba(rounds)
    assert len(plan) == rounds and all(sorted(r) == ["off", "on"] for r in plan)
    firsts = [r[0] for r in plan]
    if rounds % 4 == 0:   # every place taken by each side equally often
        assert firsts.count("on") == firsts.count("off")


def _m(rnd: int, side: str, iops: float, cpu: float | None = None) -> dict[str, object]:
    m: dict[str, object] = {"round": rnd, "side": side, "iops": iops}
    if cpu is not None:
        m["monitor"] = {"cpu_share": cpu}
    return m


def test_summarize_is_the_ratio_of_medians_and_keeps_each_round() -> None:
    ms = [_m(0, "off", 100), _m(0, "on", 90, 0.01), _m(1, "on", 99, 0.03), _m(1, "off", 100),
          _m(2, "off", 200), _m(2, "on", 196, 0.02)]
    s = summarize(ms)
    assert s["iops_off_median"] == 100 and s["iops_on_median"] == 99
    assert s["ratio"] == pytest.approx(0.99) and s["passed"] is True
    assert s["round_ratios"] == pytest.approx([0.9, 0.99, 0.98])
    assert s["round_ratio_median"] == pytest.approx(0.98)
    assert s["monitor_cpu_share_median"] == pytest.approx(0.02)
    assert summarize([_m(0, "off", 100), _m(0, "on", 80)])["passed"] is False


def test_summarize_refuses_one_sided_results() -> None:
    with pytest.raises(BenchError, match="one side"):
        summarize([_m(0, "off", 100)])


def test_a_short_real_run(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (the monitor's eBPF; CI runs as root)")
    reason = bpf_unavailable_reason()
    if reason:
        pytest.fail(f"eBPF is not usable here: {reason}")
    if shutil.which("fio") is None or shutil.which("losetup") is None:
        pytest.fail("fio and losetup are needed (scripts/setup.sh installs them)")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ublk_driver", "bench", "monitor-overhead",
                           "--rounds", "1", "--runtime", "1", "--ramp", "0.5", "--json",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          timeout=240, check=False)
    assert proc.returncode in (0, 1), proc.stderr   # 1: the goal missed on a noisy host
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "results.json").read_text())
    sides = sorted(m["side"] for m in doc["measurements"])
    assert sides == ["off", "on"] and all(m["iops"] > 0 for m in doc["measurements"])
    (on,) = [m for m in doc["measurements"] if m["side"] == "on"]
    assert on["monitor"]["source"] == "ebpf" and on["monitor"]["cpu_s"] >= 0
    assert doc["summary"]["ratio"] > 0 and doc["kind"].startswith("kernel loop")
    # The RAM loop device is gone.
    backing = [p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert not [b for b in backing if "ublkml-monitor-overhead-" in b], backing


def test_bad_device_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ublk_driver", "bench", "monitor-overhead",
                           "--device", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a block device" in proc.stderr
