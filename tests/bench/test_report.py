"""bench.report: ratios, the performance targets, Markdown rendering and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.jobs import workload_by_name
from bench.report import GOALS, check_goals, ratio, render_markdown, write_report
from bench.runner import DEVICES, device_by_name
from ublk_driver.core.cli import main as ublkml

# A full run as the report sees it: IOPS per (device, workload, queues);
# p50 latency is derived from IOPS so that the latency goal follows the figures.
GOOD = {
    ("null_blk", 1): 80_000, ("ublkml-null", 1): 60_000,
    ("null_blk", 2): 90_000, ("ublkml-null", 2): 70_000,
    ("kernel-loop", 1): 70_000, ("ublkml-loop", 1): 66_000, ("ublkml-loop", 2): 80_000,
    ("nbdkit-python", 1): 2_000, ("ublkml-python", 1): 9_000,
    ("nbdkit-python", 2): 2_500, ("ublkml-python", 2): 12_000,
    ("ublkml-python-threads", 1): 8_500, ("ublkml-python-threads", 2): 7_000,
}
#: The overhead group: IOPS per round of the plain device and the three "on" sides.
#: Medians 100,000 / 98,000 / 96,000 / 97,000: ratios 0.98 (accounting), 0.96
#: (scoring) and 0.97 (monitor).
OVERHEAD = {
    "ublkml-null-off": (100_000, 95_000, 101_000),
    "ublkml-null-acct": (98_000, 99_000, 90_000),
    "ublkml-null-score": (96_000, 93_000, 97_000),
    "ublkml-null-monitor": (97_000, 99_500, 92_000),
}


def _rec(device: str, workload: str, queues: int, iops: float | None,
         status: str = "ok", p50: float | None = None,
         round_: int | None = None) -> dict[str, Any]:
    spec = device_by_name(device)
    w = workload_by_name(workload)
    rec: dict[str, Any] = {
        "group": spec.group, "device": device, "role": spec.role,
        "baseline": spec.baseline, "workload": workload, "label": w.label, "rw": w.rw,
        "bs": w.bs, "depth": w.depth, "queues": queues, "numjobs": queues,
        "in_flight": w.depth * queues, "fio_version": "fio-3.33", "kernel": "6.12.0",
        "environment": "vm", "date": "2026-01-01T00:00:00+00:00", "status": status,
    }
    if round_ is not None:
        rec["round"] = round_
    if status == "ok":
        assert iops is not None
        lat = p50 if p50 is not None else 32e6 / iops / 1000 * w.depth / 32
        rec.update(iops=iops, bw_bytes=iops * w.bs, bw_mib_s=iops * w.bs / 2**20,
                   lat_us={"p50": lat, "p99": lat * 3, "p99.9": lat * 10, "mean": lat},
                   device_attrs={"hw_queues": queues})
    elif status == "error":
        rec["error"] = "fio failed (exit 1): boom"
    else:
        rec["reason"] = "the kernel loop driver has a single hardware queue"
    return rec


def make_doc(iops: dict[tuple[str, int], float] | None = None, *,
             workloads: tuple[str, ...] = ("4k-randread-qd1", "4k-randread-qd32"),
             overrides: dict[tuple[str, str, int], dict[str, Any]] | None = None,
             overhead: dict[str, tuple[float | None, ...]] | None = None,
             ) -> dict[str, Any]:
    """Records as the runner writes them; ``overhead``: IOPS per round (None: failed)."""
    iops = GOOD if iops is None else iops
    overhead = OVERHEAD if overhead is None else overhead
    results = []
    for w in workloads:
        for d in DEVICES:
            if d.group == "overhead":
                continue
            for q in (1, 2):
                key = (d.name, w, q)
                if overrides and key in overrides:
                    results.append(overrides[key])
                elif q > d.max_queues:
                    results.append(_rec(d.name, w, q, None, status="n/a"))
                elif (d.name, q) in iops:
                    results.append(_rec(d.name, w, q, iops[(d.name, q)]))
    rounds = max((len(v) for v in overhead.values()), default=0)
    for r in range(rounds):  # alternating, as measured
        for dev, values in overhead.items():
            if r < len(values):
                v = values[r]
                results.append(_rec(dev, "4k-randread-qd32", 1, v, round_=r,
                                    status="ok" if v is not None else "error"))
    meta = {"schema": 1, "date": "2026-01-01T00:00:00+00:00", "quick": False,
            "runtime_s": 10.0, "ramp_s": 2.0, "fio_version": "fio-3.33", "git_commit": "abc123",
            "environment": "vm", "kernel": "6.12.0", "cpus": 2, "memory_mib": 3920,
            "elapsed_s": 1200.0, "skipped_groups": [],
            "devices": {d.name: {"group": d.group, "role": d.role, "baseline": d.baseline,
                                 "description": d.description} for d in DEVICES},
            "vm": {"accel": "tcg", "cpus": 2, "memory_mib": 4096, "boot_s": 7.0,
                   "total_s": 1260.0},
            "host": {"kernel": "6.18", "cpus": 2, "loadavg_before": [0.5, 0.4, 0.3],
                     "loadavg_after": [2.0, 1.5, 1.0], "other_qemu_before": 1,
                     "other_qemu_after": 0}}
    return {"meta": meta, "results": results}


def _by_key(doc: dict[str, Any]) -> dict[str, report.GoalResult]:
    return {g.goal.key: g for g in check_goals(doc)}


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_goals_pass() -> None:
    goals = _by_key(make_doc())
    assert set(goals) == {g.key for g in GOALS}
    assert goals["null-iops"].status == "PASS"
    assert goals["null-iops"].ratio == pytest.approx(0.75)
    assert goals["loop-iops"].ratio == pytest.approx(66 / 70)
    assert goals["loop-iops"].status == "PASS"
    assert goals["python-iops"].ratio == pytest.approx(4.5)
    assert goals["null-scaling"].ratio == pytest.approx(70 / 60)
    assert goals["loop-scaling"].status == "PASS"
    assert goals["python-scaling"].status == "PASS"
    # p50 is inversely proportional to IOPS in make_doc: 80/60 = 1.33 <= 1.5
    assert goals["null-qd1-latency"].ratio == pytest.approx(80 / 60)
    assert goals["null-qd1-latency"].status == "PASS"
    assert "60,000 vs 80,000 IOPS" in goals["null-iops"].detail


def test_goals_fail_at_the_thresholds() -> None:
    iops = dict(GOOD)
    iops[("ublkml-null", 1)] = 0.69 * 80_000      # just under 0.70
    iops[("ublkml-loop", 1)] = 0.899 * 70_000     # just under 0.90
    iops[("ublkml-python", 1)] = 2.99 * 2_000     # just under 3
    iops[("ublkml-null", 2)] = iops[("ublkml-null", 1)]  # equal is not "more"
    goals = _by_key(make_doc(iops))
    for key in ("null-iops", "loop-iops", "python-iops", "null-scaling"):
        assert goals[key].status == "FAIL", key
    # 80/55.2 = 1.45: still within 1.5 x
    assert goals["null-qd1-latency"].status == "PASS"


def test_goal_boundaries_are_inclusive_where_the_goal_says_so() -> None:
    iops = dict(GOOD)
    iops[("ublkml-null", 1)] = 0.70 * 80_000
    iops[("ublkml-python", 1)] = 3 * 2_000
    goals = _by_key(make_doc(iops))
    assert goals["null-iops"].status == "PASS"      # >= 0.70
    assert goals["python-iops"].status == "PASS"    # >= 3


def test_latency_goal_fails() -> None:
    over = {("ublkml-null", "4k-randread-qd1", 1): _rec("ublkml-null", "4k-randread-qd1", 1,
                                                      60_000, p50=100.0),
            ("null_blk", "4k-randread-qd1", 1): _rec("null_blk", "4k-randread-qd1", 1,
                                                   80_000, p50=50.0)}
    g = _by_key(make_doc(overrides=over))["null-qd1-latency"]
    assert g.status == "FAIL"
    assert g.ratio == pytest.approx(2.0)
    assert "p50 100.0 vs 50.0 us" in g.detail


def test_goals_na_when_a_figure_is_missing_or_failed() -> None:
    over = {("nbdkit-python", "4k-randread-qd32", 1):
            _rec("nbdkit-python", "4k-randread-qd32", 1, None, status="error")}
    goals = _by_key(make_doc(overrides=over, workloads=("4k-randread-qd32",)))
    assert goals["python-iops"].status == "n/a"
    assert "nbdkit-python 4k-randread-qd32 q1 failed" in goals["python-iops"].detail
    assert goals["null-qd1-latency"].status == "n/a"
    assert "not measured" in goals["null-qd1-latency"].detail
    assert goals["null-iops"].status == "PASS"


def test_markdown_has_tables_and_pass_fail_lines() -> None:
    iops = dict(GOOD)
    iops[("ublkml-loop", 1)] = 35_000
    md = render_markdown(make_doc(iops))
    assert md.startswith("# ublkml benchmark report")
    assert "## Targets" in md
    assert "9 PASS, 1 FAIL, 0 n/a" in md
    assert "- PASS: ublkml null >= 0.70 x null_blk IOPS (4k randread QD32, 1 queue): " \
           "ratio 0.75 (60,000 vs 80,000 IOPS)" in md
    assert "- FAIL: ublkml loop >= 0.90 x kernel loop IOPS" in md
    assert "| ublkml loop >= 0.90 x kernel loop IOPS (4k randread QD32, 1 queue) | " \
           "35,000 vs 70,000 IOPS | 0.50 | >= 0.9 | **FAIL** |" in md
    # The group tables: IOPS, MiB/s and ratios side by side.
    assert "| workload | queues | null_blk IOPS | ublkml-null IOPS | ratio | null_blk MiB/s" \
           in md
    assert "| 4k randread QD32 | 1 | 80,000 | 60,000 | 0.75 | 312.5 | 234.4 | 0.75 |" in md
    # Kernel loop has one hardware queue: its 2-queue cells say n/a.
    assert "| 4k randread QD32 | 2 | n/a | 80,000 | - |" in md
    # Latency table: p50 / p99 / p99.9 per device.
    assert "| workload | queues | null_blk | ublkml-null | p50 ratio | p99 ratio |" in md
    assert "### Queue scaling" in md
    assert "| ublkml-null | 60,000 | 70,000 | 1.17 |" in md
    # Queue threads of a Python plug-in: in the scaling table, not a goal.
    assert "| ublkml-python-threads | 8,500 | 7,000 | 0.82 |" in md
    assert "python-threads" not in "".join(g.goal.key for g in check_goals(make_doc(iops)))
    assert "## Devices" in md and "**ublkml-loop**" in md
    assert "host load average 0.50 before, 2.00 after" in md
    assert "## Errors" not in md


def test_markdown_lists_errors() -> None:
    over = {("ublkml-null", "4k-randread-qd32", 2):
            _rec("ublkml-null", "4k-randread-qd32", 2, None, status="error")}
    md = render_markdown(make_doc(overrides=over))
    assert "## Errors" in md
    assert "- ublkml-null 4k randread QD32 q2: fio failed (exit 1): boom" in md
    assert "| 4k randread QD32 | 2 | 90,000 | error | - |" in md
    assert "n/a: ublkml null: 2 queues > 1 queue IOPS" in md


def test_markdown_quick_and_interrupted_and_profile() -> None:
    doc = make_doc(workloads=("4k-randread-qd32",))
    doc["meta"].update(quick=True, interrupted=True)
    rec = next(r for r in doc["results"] if r["device"] == "ublkml-python"
               and r["queues"] == 1)
    rec["profile"] = {"wall_s": 12.0, "user_s": 6.0, "sys_s": 3.0, "cpu_util": 0.75,
                      "cpu_us_per_io": 83.3,
                      "threads": [{"tid": 1, "name": "python", "user_s": 5.0, "sys_s": 2.0}]}
    md = render_markdown(doc)
    assert "**--quick**" in md
    assert "interrupted" in md
    assert "## Server CPU profile" in md
    assert "| ublkml-python | 4k randread QD32 | 1 | 0.75 | 83.3 | 6.0 / 3.0 | python 7.0s |" \
        in md
    assert "Where the time goes" not in md  # no samples: no section
    assert "hybrid polling" not in md
    doc["meta"]["poll_us"] = 50
    assert "- every ublkml device with hybrid polling: `--poll-us 50`" in render_markdown(doc)


def test_markdown_py_spy_samples_and_sampler_errors() -> None:
    doc = make_doc(workloads=("4k-randread-qd32",))
    prof = {"wall_s": 12.0, "user_s": 6.0, "sys_s": 3.0, "cpu_util": 0.75,
            "cpu_us_per_io": 83.3, "threads": []}
    recs = [r for r in doc["results"] if r["device"] == "ublkml-python"]
    recs[0]["profile"] = {**prof, "samples": {
        "samples": 1200, "waiting_share": 0.25, "threads": [],
        "self": [{"frame": "memcpy (libc.so.6)", "share": 0.3}],
        "python": [{"frame": "handle (plugin.py)", "share": 0.5}]}}
    recs[1]["profile"] = {**prof, "samples": {"error": "py-spy exited 1: no such process"}}
    md = render_markdown(doc)
    assert "### Where the time goes" in md
    assert ("| ublkml-python 4k randread QD32 q1 | 1200 | 25% | 30% `memcpy (libc.so.6)` | "
            "50% `handle (plugin.py)` |") in md
    assert "- ublkml-python 4k randread QD32 q2: py-spy exited 1: no such process" in md


def test_write_report_with_plots(tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (extra "bench"; `make setup` installs it)

    doc = make_doc()
    path = write_report(doc, tmp_path)
    md = path.read_text()
    for w in ("4k-randread-qd1", "4k-randread-qd32"):
        for kind in ("iops", "latency"):
            png = tmp_path / f"{kind}-{w}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({kind}-{w}.png)" in md


def test_plots_of_an_overhead_only_run(tmp_path: Path) -> None:
    """`bench --skip null --skip loop --skip python`: no chart to draw, and no crash
    (a log scale over no data raised ValueError)."""
    import matplotlib  # noqa: F401

    doc = make_doc(iops={})
    assert report.make_plots(doc, tmp_path) == []
    assert "overhead" in write_report(doc, tmp_path).read_text()


def test_write_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    def no_matplotlib(doc: dict[str, Any], outdir: Path) -> list[str]:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "make_plots", no_matplotlib)
    md = write_report(make_doc(), tmp_path).read_text()
    assert "Plots skipped: matplotlib is not installed" in md
    assert "## Targets" in md


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "results.json"
    src.write_text(json.dumps(make_doc()))
    out = tmp_path / "copy.md"
    assert ublkml(["bench", "report", str(src), "--out", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "## Targets" in out.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_header_flags_a_dirty_tree_and_an_engine_rebuilt_mid_run() -> None:
    doc = make_doc(workloads=("4k-randread-qd32",))
    doc["meta"].update(git_dirty=["ublk_driver/queue.py"], engine="aaaa")
    ublk = [r for r in doc["results"] if r["role"] == "ublkml" and r["status"] == "ok"]
    for i, r in enumerate(ublk):
        r["device_attrs"]["engine"] = "aaaa" if i == 0 else "bbbb"
    md = render_markdown(doc)
    assert "working tree differs from the commit in: ublk_driver/queue.py" in md
    assert "ublkml engine build: aaaa, bbbb (**changed during the run**)" in md
    for r in ublk:
        r["device_attrs"]["engine"] = "aaaa"
    assert "ublkml engine build: aaaa\n" in render_markdown(doc)


def test_header_shows_noise_sampled_during_the_run() -> None:
    doc = make_doc(workloads=("4k-randread-qd32",))
    doc["meta"]["host"]["during"] = {"samples": 100, "other_qemu_max": 1,
                                     "other_qemu_share": 0.4, "loadavg_mean": 2.9,
                                     "loadavg_max": 3.8}
    md = render_markdown(doc)
    assert ("2.90 on average during the run (max 3.80); another qemu process was running "
            "in 40% of 100 samples (at most 1 at once)") in md


# ---- the overhead group: medians of alternating rounds -------------------------


def test_overhead_goals_compare_medians_of_the_rounds() -> None:
    goals = _by_key(make_doc())
    acct, score = goals["accounting-overhead"], goals["scoring-overhead"]
    mon = goals["monitoring-overhead"]
    assert acct.goal.kind == score.goal.kind == mon.goal.kind == "median_iops_ratio"
    assert (mon.goal.device, mon.goal.other) == ("ublkml-null-monitor", "ublkml-null-off")
    assert (mon.goal.workload, mon.goal.queues) == ("4k-randread-qd32", 1)
    assert mon.ratio == pytest.approx(97_000 / 100_000)
    assert mon.status == "PASS"
    assert mon.detail == "median 97,000 vs 100,000 IOPS (3 rounds)"
    assert acct.ratio == pytest.approx(98_000 / 100_000)
    assert acct.status == "PASS"
    assert acct.detail == "median 98,000 vs 100,000 IOPS (3 rounds)"
    assert score.ratio == pytest.approx(96_000 / 100_000)
    assert score.status == "PASS"
    assert report.median_iops(make_doc(), "ublkml-null-off") == 100_000


def test_overhead_goals_fail_under_their_thresholds_and_pass_at_them() -> None:
    off = (100_000.0, 100_000.0, 100_000.0)
    doc = make_doc(overhead={"ublkml-null-off": off,
                             "ublkml-null-acct": (96_900.0, 99_000.0, 90_000.0),
                             "ublkml-null-score": (94_999.0, 94_000.0, 99_000.0),
                             "ublkml-null-monitor": (99_000.0, 90_000.0, 94_990.0)})
    goals = _by_key(doc)
    assert goals["accounting-overhead"].status == "FAIL"   # 0.969 < 0.97
    assert goals["scoring-overhead"].status == "FAIL"      # 0.94999 < 0.95
    assert goals["monitoring-overhead"].status == "FAIL"   # 0.9499 < 0.95
    doc = make_doc(overhead={"ublkml-null-off": off,
                             "ublkml-null-acct": (97_000.0,) * 3,
                             "ublkml-null-score": (95_000.0,) * 3,
                             "ublkml-null-monitor": (95_000.0,) * 3})
    goals = _by_key(doc)
    assert goals["accounting-overhead"].status == "PASS"   # >= 0.97
    assert goals["scoring-overhead"].status == "PASS"      # >= 0.95
    assert goals["monitoring-overhead"].status == "PASS"   # >= 0.95


def test_overhead_goals_use_the_rounds_that_succeeded_and_say_so() -> None:
    doc = make_doc(overhead={"ublkml-null-off": (100_000.0, 90_000.0, 110_000.0),
                             "ublkml-null-acct": (None, 99_000.0, None),
                             "ublkml-null-score": (None, None, None)})
    goals = _by_key(doc)
    acct = goals["accounting-overhead"]
    assert acct.ratio == pytest.approx(0.99)
    assert acct.detail == "median 99,000 vs 100,000 IOPS (1 vs 3 rounds)"
    score = goals["scoring-overhead"]
    assert score.status == "n/a"
    assert score.detail == "ublkml-null-score 4k-randread-qd32 q1 failed in all 3 round(s)"
    missing = _by_key(make_doc(overhead={}))["accounting-overhead"]
    assert missing.status == "n/a"
    assert missing.detail == ("ublkml-null-acct 4k-randread-qd32 q1 not measured; "
                              "ublkml-null-off 4k-randread-qd32 q1 not measured")


def test_markdown_overhead_lines_and_table() -> None:
    doc = make_doc()
    acct = next(r for r in doc["results"] if r["device"] == "ublkml-null-acct")
    acct["accounting"] = {"attach": "tp_btf", "ios_counted": 123_456}
    md = render_markdown(doc)
    assert ("- PASS: eBPF accounting on >= 0.97 x off IOPS (ublkml null, 4k randread QD32, "
            "1 queue, median of rounds): ratio 0.98 (median 98,000 vs 100,000 IOPS "
            "(3 rounds))") in md
    assert "| ublkml null --score >= 0.95 x plain IOPS (4k randread QD32, 1 queue, median " \
           "of rounds) | median 96,000 vs 100,000 IOPS (3 rounds) | 0.96 | >= 0.95 | " \
           "**PASS** |" in md
    assert ("### overhead: ublkml null plain vs eBPF accounting on vs --score vs drive "
            "monitor on (4k randread QD32, 1 queue)") in md
    assert ("Each round measures the plain device, the same device with accounting on, the "
            "scoring device, and the same device with monitor on, ") in md
    assert ("| round | ublkml-null-off IOPS | accounting on IOPS | ratio | --score IOPS | "
            "ratio | monitor on IOPS | ratio |") in md
    assert "| 2 | 95,000 | 99,000 | 1.04 | 93,000 | 0.98 | 99,500 | 1.05 |" in md
    assert "| **median** | 100,000 | 98,000 | 0.98 | 96,000 | 0.96 | 97,000 | 0.97 |" in md
    # Each round's ratio, then their median: acct 0.98, 1.04, 0.89; score 0.96, 0.98,
    # 0.96; monitor 0.97, 1.05, 0.91.
    assert "| median of the rounds' ratios |  |  | 0.98 |  | 0.96 |  | 0.97 |" in md
    assert "The accounting (tp_btf) counted 123,456 I/Os" in md
    assert ("- PASS: drive monitor on >= 0.95 x off IOPS (ublkml null, 4k randread QD32, "
            "1 queue, median of rounds): ratio 0.97 (median 97,000 vs 100,000 IOPS "
            "(3 rounds))") in md


def test_markdown_says_what_the_monitor_did() -> None:
    doc = make_doc()
    mons = [r for r in doc["results"] if r["device"] == "ublkml-null-monitor"]
    for n, r in enumerate(mons):
        r["monitor"] = {"drive": "ublkb0", "source": "ebpf", "nice": -10, "ticks": 12 + n,
                        "samples": 10, "tick_ms_p50": 2.0 + n, "cpu_s": 0.25,
                        "cpu_share": 0.02}
    md = render_markdown(doc)
    assert ("The monitor (ebpf, nice -10) ticked 12, 13, 14 times in its rounds, with I/O in "
            "10, 10, 10 intervals of its last window; a tick took 3.0 ms (median of the "
            "p50s); its CPU time while measured: 0.25 s (2.0% of a CPU), 0.25 s (2.0% of a "
            "CPU), 0.25 s (2.0% of a CPU).") in md


def test_overhead_table_of_results_without_the_monitor() -> None:
    """Results measured before the monitor was in the group: the same table as
    then (no monitor column), and the monitoring goal n/a, not measured."""
    doc = make_doc(overhead={k: v for k, v in OVERHEAD.items() if k != "ublkml-null-monitor"})
    md = render_markdown(doc)
    assert ("### overhead: ublkml null plain vs eBPF accounting on vs --score (4k randread "
            "QD32, 1 queue)") in md
    assert ("Each round measures the plain device, the same device with accounting on, and "
            "the scoring device, ") in md
    assert "| 2 | 95,000 | 99,000 | 1.04 | 93,000 | 0.98 |" in md
    assert "| median of the rounds' ratios |  |  | 0.98 |  | 0.96 |" in md
    assert "monitor on IOPS" not in md
    goal = _by_key(doc)["monitoring-overhead"]
    assert goal.status == "n/a"
    assert goal.detail == "ublkml-null-monitor 4k-randread-qd32 q1 not measured"


def test_markdown_overhead_errors_name_the_round() -> None:
    doc = make_doc(overhead={"ublkml-null-off": (100_000.0, 100_000.0),
                             "ublkml-null-acct": (99_000.0, None),
                             "ublkml-null-score": (96_000.0, 96_000.0),
                             "ublkml-null-monitor": (None, 98_000.0)})
    md = render_markdown(doc)
    assert "- ublkml-null-acct 4k randread QD32 q1 round 2: fio failed (exit 1): boom" in md
    assert "- ublkml-null-monitor 4k randread QD32 q1 round 1: fio failed (exit 1): boom" in md
    assert "| 1 | 100,000 | 99,000 | 0.99 | 96,000 | 0.96 | error | - |" in md
    assert "| 2 | 100,000 | error | - | 96,000 | 0.96 | 98,000 | 0.98 |" in md


def test_markdown_bpf_cost_line() -> None:
    doc = make_doc()
    doc["meta"]["bpf_cost"] = {
        "programs": {"ka_btf_issue": {"run_time_ns": 20_000, "run_cnt": 100},
                     "ka_btf_complete": {"run_time_ns": 30_000, "run_cnt": 100}},
        "ios": 100, "ns_per_io": 500.0, "iops": 40_000.0, "cpu_share": 0.02}
    md = render_markdown(doc)
    assert "500 ns of eBPF per I/O (ka_btf_complete 300 ns x 100, ka_btf_issue 200 ns x 100; " \
           "100 I/Os), 2.00% of one CPU at 40,000 IOPS" in md
    assert "implied ratio of at least 0.980" in md
    doc["meta"]["bpf_cost"] = {"error": "cannot enable it"}
    assert "Cost per I/O by bpf_stats: not measured (cannot enable it)." in render_markdown(doc)


def _with_goal_rounds(doc: dict[str, Any], rounds: dict[tuple[str, str, int],
                      tuple[float | None, ...]]) -> dict[str, Any]:
    """``doc`` with the given cases replaced by records per round (None: failed)."""
    results = [r for r in doc["results"]
               if (r["device"], r["workload"], r["queues"]) not in rounds]
    for (dev, w, q), values in rounds.items():
        results += [_rec(dev, w, q, v, round_=n, status="ok" if v is not None else "error")
                    for n, v in enumerate(values)]
    doc["results"] = results
    doc["meta"]["goal_rounds"] = max(len(v) for v in rounds.values())
    return doc


def test_goals_compare_medians_of_the_goal_rounds_and_show_each_round() -> None:
    # Round 2 is an outlier either way; the medians (60k vs 80k) decide.
    doc = _with_goal_rounds(make_doc(), {
        ("null_blk", "4k-randread-qd32", 1): (80_000, 40_000, 82_000),
        ("ublkml-null", "4k-randread-qd32", 1): (60_000, 58_000, 30_000),
    })
    g = _by_key(doc)["null-iops"]
    assert g.ratio == pytest.approx(58_000 / 80_000)
    assert g.status == "PASS"
    assert g.detail == ("58,000 vs 80,000 IOPS (median of 3 rounds; per round "
                        "0.75, 1.45, 0.37)")
    # The tables show the medians too, and say so.
    md = render_markdown(doc)
    assert "| 4k randread QD32 | 1 | 80,000 | 58,000 | 0.72 |" in md
    assert "ran 3 rounds" in md


def test_goal_rounds_medians_of_latency_and_scaling() -> None:
    doc = _with_goal_rounds(make_doc(), {
        ("null_blk", "4k-randread-qd1", 1): (10_000, 11_000, 9_000),
        ("ublkml-null", "4k-randread-qd1", 1): (8_000, 5_000, 7_000),
        ("ublkml-python", "4k-randread-qd32", 1): (10_000, 9_000, 11_000),
        ("ublkml-python", "4k-randread-qd32", 2): (9_000, 12_000, 10_500),
    })
    goals = _by_key(doc)
    # make_doc derives p50 from IOPS (p50 = 1e3/iops * depth/32 us): medians
    # 1/10k vs 1/7k -> 10/7.
    assert goals["null-qd1-latency"].ratio == pytest.approx(10 / 7)
    assert goals["null-qd1-latency"].status == "PASS"
    assert "median of 3 rounds" in goals["null-qd1-latency"].detail
    assert goals["python-scaling"].ratio == pytest.approx(10_500 / 10_000)
    assert goals["python-scaling"].detail.endswith("per round 0.90, 1.33, 0.95)")


def test_goal_rounds_that_failed_are_left_out_of_the_median() -> None:
    doc = _with_goal_rounds(make_doc(), {
        ("null_blk", "4k-randread-qd32", 1): (80_000, 80_000, 80_000),
        ("ublkml-null", "4k-randread-qd32", 1): (None, 60_000, 64_000),
    })
    g = _by_key(doc)["null-iops"]
    assert g.ratio == pytest.approx(62_000 / 80_000)
    # Per-round ratios only where both sides of the round succeeded.
    assert g.detail.endswith("(median of 3 rounds; per round 0.75, 0.80)")
    idx = report.index_results(doc)
    rec = idx[("ublkml-null", "4k-randread-qd32", 1)]
    assert (rec["rounds"], rec["rounds_ok"], rec["status"]) == (3, 2, "ok")
    # No round at all: the case is an error with the last round's message.
    doc = _with_goal_rounds(make_doc(), {
        ("ublkml-null", "4k-randread-qd32", 1): (None, None),
    })
    assert _by_key(doc)["null-iops"].status == "n/a"
    assert report.index_results(doc)[("ublkml-null", "4k-randread-qd32", 1)]["status"] == \
        "error"
