"""The benchmark report: Markdown tables, the performance targets (PASS/FAIL), PNG plots.

Input is the ``results.json`` document the runner writes (see
docs/benchmarks.md for its fields).  Everything here is pure computation on
that document except :func:`make_plots`, which needs matplotlib (the optional
``bench`` extra) and is skipped, with a note in the report, without it.

Re-render a report from saved results::

    ublkml bench report results/bench-full/results.json [--out report.md] [--no-plots]
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GOALS",
    "Goal",
    "GoalResult",
    "check_goals",
    "index_results",
    "make_plots",
    "median_iops",
    "ratio",
    "render_markdown",
    "write_report",
]

Key = tuple[str, str, int]
"""(device, workload name, queues)"""

#: The devices of each group, baseline first, as the tables show them.
#: group -> (baseline, ublkml device, further ublkml devices compared with it)
GROUP_DEVICES: dict[str, tuple[str, ...]] = {
    "null": ("null_blk", "ublkml-null"),
    "loop": ("kernel-loop", "ublkml-loop"),
    # ublkml-python-proc: explicit --queue-processes, in results that measured it
    "python": ("nbdkit-python", "ublkml-python", "ublkml-python-threads",
               "ublkml-python-proc"),
}
GROUP_TITLES = {
    "null": "null: kernel null_blk vs ublkml null target",
    "loop": "loop: kernel loop (direct I/O) vs ublkml loop target, same backing file",
    "python": "python: nbdkit Python plug-in over kernel NBD vs ublkml Python plug-in, "
              "same RamStore",
}
HEADLINE = "4k-randread-qd32"
#: The overhead group: the plain device, then the "on" sides.
OVERHEAD_OFF = "ublkml-null-off"
OVERHEAD_ON = ("ublkml-null-acct", "ublkml-null-score", "ublkml-null-monitor")
#: What the overhead table calls each "on" side.
OVERHEAD_LABELS = {"ublkml-null-acct": "accounting on", "ublkml-null-score": "--score",
                   "ublkml-null-monitor": "monitor on"}


@dataclass(frozen=True)
class Goal:
    """One performance goal: a ratio between two measured figures and its threshold."""

    key: str
    text: str
    kind: str
    """``iops_ratio`` (device / other >= threshold), ``scaling`` (2 queues / 1
    queue > threshold), ``latency_ratio`` (p50 device / other <= threshold) or
    ``median_iops_ratio`` (median IOPS of the device's rounds / median of the
    other's >= threshold: the overhead group)."""
    device: str
    other: str | None
    workload: str
    queues: int
    threshold: float


GOALS: tuple[Goal, ...] = (
    Goal("null-iops", "ublkml null >= 0.70 x null_blk IOPS (4k randread QD32, 1 queue)",
         "iops_ratio", "ublkml-null", "null_blk", HEADLINE, 1, 0.70),
    Goal("loop-iops", "ublkml loop >= 0.90 x kernel loop IOPS (4k randread QD32, 1 queue)",
         "iops_ratio", "ublkml-loop", "kernel-loop", HEADLINE, 1, 0.90),
    Goal("python-iops",
         "ublkml python >= 3 x nbdkit python IOPS (4k randread QD32, 1 queue)",
         "iops_ratio", "ublkml-python", "nbdkit-python", HEADLINE, 1, 3.0),
    Goal("null-scaling", "ublkml null: 2 queues > 1 queue IOPS (4k randread QD32)",
         "scaling", "ublkml-null", None, HEADLINE, 2, 1.0),
    Goal("loop-scaling", "ublkml loop: 2 queues > 1 queue IOPS (4k randread QD32)",
         "scaling", "ublkml-loop", None, HEADLINE, 2, 1.0),
    Goal("python-scaling", "ublkml python: 2 queues > 1 queue IOPS (4k randread QD32; "
         "default queue model)",
         "scaling", "ublkml-python", None, HEADLINE, 2, 1.0),
    Goal("null-qd1-latency",
         "ublkml null QD1 p50 latency <= 1.5 x null_blk (4k randread QD1, 1 queue)",
         "latency_ratio", "ublkml-null", "null_blk", "4k-randread-qd1", 1, 1.5),
    Goal("accounting-overhead",
         "eBPF accounting on >= 0.97 x off IOPS (ublkml null, 4k randread QD32, 1 queue, "
         "median of rounds)",
         "median_iops_ratio", "ublkml-null-acct", OVERHEAD_OFF, HEADLINE, 1, 0.97),
    Goal("scoring-overhead",
         "ublkml null --score >= 0.95 x plain IOPS (4k randread QD32, 1 queue, "
         "median of rounds)",
         "median_iops_ratio", "ublkml-null-score", OVERHEAD_OFF, HEADLINE, 1, 0.95),
    Goal("monitoring-overhead",
         "drive monitor on >= 0.95 x off IOPS (ublkml null, 4k randread QD32, 1 queue, "
         "median of rounds)",
         "median_iops_ratio", "ublkml-null-monitor", OVERHEAD_OFF, HEADLINE, 1, 0.95),
)


@dataclass(frozen=True)
class GoalResult:
    goal: Goal
    status: str
    """``PASS``, ``FAIL`` or ``n/a`` (a figure is missing: not measured, or failed)."""
    ratio: float | None
    detail: str


# ---------------------------------------------------------------------------
# Computation
# ---------------------------------------------------------------------------


def _key(rec: dict[str, Any]) -> Key:
    return (rec["device"], rec["workload"], int(rec["queues"]))


def _median_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for a case measured in rounds: the median of each figure.

    IOPS, bandwidth and each latency percentile are medians over the rounds
    that succeeded (the p50 shown is the median of the rounds' p50s, not a
    percentile of the pooled samples).  A single record is returned as it is;
    if no round succeeded, the last one (with its error).
    """
    if len(recs) == 1:
        return recs[0]
    ok = [r for r in recs if _ok(r)]
    if not ok:
        return recs[-1]
    out = {k: v for k, v in ok[0].items() if k != "round"}
    for field in ("iops", "bw_mib_s", "bw_bytes"):
        if all(field in r for r in ok):
            out[field] = statistics.median(float(r[field]) for r in ok)
    out["lat_us"] = {p: statistics.median(float(r["lat_us"][p]) for r in ok)
                     for p in ok[0]["lat_us"] if all(p in r["lat_us"] for r in ok)}
    out["rounds"], out["rounds_ok"] = len(recs), len(ok)
    return out


def index_results(doc: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    """Records by (device, workload, queues); a case measured in rounds (the
    overhead group, the goals' cases) gets the medians of its rounds."""
    by: dict[Key, list[dict[str, Any]]] = {}
    for r in doc.get("results", []):
        by.setdefault(_key(r), []).append(r)
    return {k: _median_record(v) for k, v in by.items()}


def _rounds(doc: dict[str, Any], key: Key) -> dict[int, dict[str, Any]]:
    """The successful records of a case by round (one record: round 0)."""
    return {int(r.get("round", 0)): r for r in doc.get("results", [])
            if _key(r) == key and _ok(r)}


def _round_ratios(doc: dict[str, Any], a_key: Key, b_key: Key, pct: str | None = None
                  ) -> list[float]:
    """Per-round ratios a / b (IOPS, or latency percentile ``pct``) over the
    rounds both cases have; each round's two figures were taken side by side."""
    a, b = _rounds(doc, a_key), _rounds(doc, b_key)
    out = []
    for n in sorted(a.keys() & b.keys()):
        num, den = ((float(a[n]["iops"]), float(b[n]["iops"])) if pct is None else
                    (float(a[n]["lat_us"][pct]), float(b[n]["lat_us"][pct])))
        if (r := ratio(num, den)) is not None:
            out.append(r)
    return out


def _rounds_note(doc: dict[str, Any], idx: dict[Key, dict[str, Any]], a_key: Key,
                 b_key: Key, pct: str | None = None) -> str:
    """`` (median of 3 rounds; per round 0.78, 0.81, 0.84)`` for a goal whose
    cases ran in rounds (ratios as in :func:`_round_ratios`), '' for single runs."""
    n = max(int(idx[k].get("rounds", 1)) for k in (a_key, b_key) if k in idx)
    if n < 2:
        return ""
    spread = ", ".join(f"{r:.2f}" for r in _round_ratios(doc, a_key, b_key, pct))
    return f" (median of {n} rounds; per round {spread})"


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``; None when either is missing or the denominator is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _ok(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") == "ok"


def _iops(idx: dict[Key, dict[str, Any]], key: Key) -> float | None:
    rec = idx.get(key)
    return float(rec["iops"]) if rec is not None and _ok(rec) else None


def _lat(idx: dict[Key, dict[str, Any]], key: Key, pct: str) -> float | None:
    rec = idx.get(key)
    return float(rec["lat_us"][pct]) if rec is not None and _ok(rec) else None


def _why_missing(idx: dict[Key, dict[str, Any]], key: Key) -> str:
    rec = idx.get(key)
    if rec is None:
        return f"{key[0]} {key[1]} q{key[2]} not measured"
    if rec.get("status") == "n/a":
        return f"{key[0]} q{key[2]} n/a"
    return f"{key[0]} {key[1]} q{key[2]} failed"


def round_iops(doc: dict[str, Any], device: str, workload: str = HEADLINE,
               queues: int = 1) -> list[float]:
    """IOPS of every successful record (every round) of a device, in run order."""
    return [float(r["iops"]) for r in doc.get("results", [])
            if r["device"] == device and r["workload"] == workload
            and int(r["queues"]) == queues and _ok(r)]


def median_iops(doc: dict[str, Any], device: str, workload: str = HEADLINE,
                queues: int = 1) -> float | None:
    """The median IOPS over a device's rounds; None if none succeeded."""
    values = round_iops(doc, device, workload, queues)
    return statistics.median(values) if values else None


def _why_no_rounds(doc: dict[str, Any], device: str, workload: str, queues: int) -> str:
    recs = [r for r in doc.get("results", []) if r["device"] == device
            and r["workload"] == workload and int(r["queues"]) == queues]
    if not recs:
        return f"{device} {workload} q{queues} not measured"
    return f"{device} {workload} q{queues} failed in all {len(recs)} round(s)"


def _median_goal(doc: dict[str, Any], g: Goal) -> GoalResult:
    assert g.other is not None
    a = median_iops(doc, g.device, g.workload, g.queues)
    b = median_iops(doc, g.other, g.workload, g.queues)
    r = ratio(a, b)
    if r is None:
        missing = [_why_no_rounds(doc, d, g.workload, g.queues)
                   for d, v in ((g.device, a), (g.other, b)) if v is None]
        return GoalResult(g, "n/a", None, "; ".join(missing))
    n_on = len(round_iops(doc, g.device, g.workload, g.queues))
    n_off = len(round_iops(doc, g.other, g.workload, g.queues))
    rounds = f"{n_on} round{'s' if n_on != 1 else ''}" if n_on == n_off else \
        f"{n_on} vs {n_off} rounds"
    detail = f"median {_fmt_iops(a)} vs {_fmt_iops(b)} IOPS ({rounds})"
    return GoalResult(g, "PASS" if r >= g.threshold else "FAIL", r, detail)


def check_goals(doc: dict[str, Any], goals: Iterable[Goal] = GOALS) -> list[GoalResult]:
    """Each goal's status and measured ratio."""
    idx = index_results(doc)
    out: list[GoalResult] = []
    for g in goals:
        if g.kind == "median_iops_ratio":
            out.append(_median_goal(doc, g))
            continue
        if g.kind == "scaling":
            a_key: Key = (g.device, g.workload, g.queues)
            b_key: Key = (g.device, g.workload, 1)
            a, b = _iops(idx, a_key), _iops(idx, b_key)
            r = ratio(a, b)
            detail = (f"{_fmt_iops(a)} IOPS with 2 queues vs {_fmt_iops(b)} with 1"
                      + _rounds_note(doc, idx, a_key, b_key) if r is not None else "")
            passed = r is not None and r > g.threshold
        elif g.kind in ("iops_ratio", "latency_ratio"):
            assert g.other is not None
            a_key, b_key = (g.device, g.workload, g.queues), (g.other, g.workload, g.queues)
            if g.kind == "iops_ratio":
                a, b = _iops(idx, a_key), _iops(idx, b_key)
                r = ratio(a, b)
                detail = (f"{_fmt_iops(a)} vs {_fmt_iops(b)} IOPS"
                          + _rounds_note(doc, idx, a_key, b_key) if r is not None else "")
                passed = r is not None and r >= g.threshold
            else:
                a, b = _lat(idx, a_key, "p50"), _lat(idx, b_key, "p50")
                r = ratio(a, b)
                detail = (f"p50 {_fmt_us(a)} vs {_fmt_us(b)} us"
                          + _rounds_note(doc, idx, a_key, b_key, "p50")
                          if r is not None else "")
                passed = r is not None and r <= g.threshold
        else:
            raise ValueError(f"unknown goal kind {g.kind!r}")
        if r is None:
            missing = [_why_missing(idx, k) for k in (a_key, b_key) if not _ok(idx.get(k))]
            out.append(GoalResult(g, "n/a", None, "; ".join(missing)))
        else:
            out.append(GoalResult(g, "PASS" if passed else "FAIL", r, detail))
    return out


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------


def _fmt_iops(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt_bw(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    if v < 10:
        return f"{v:.2f}"
    if v < 1000:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _cell(rec: dict[str, Any] | None, value: str) -> str:
    """What a table cell shows: the value, or why there is none."""
    if rec is None:
        return "-"
    status = rec.get("status")
    if status == "n/a":
        return "n/a"
    if status != "ok":
        return "error"
    return value


def _table(header: Sequence[str], rows: Iterable[Sequence[str]],
           align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _workloads(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, label) of the workloads in the results, in run order."""
    seen: dict[str, str] = {}
    for r in doc.get("results", []):
        seen.setdefault(r["workload"], r.get("label", r["workload"]))
    from bench.jobs import WORKLOADS

    order = {w.name: i for i, w in enumerate(WORKLOADS)}
    return sorted(seen.items(), key=lambda kv: order.get(kv[0], len(order)))


def _group_tables(doc: dict[str, Any], group: str) -> list[str]:
    """The group's tables: each ublkml device of the group against the baseline."""
    base, *ubs = GROUP_DEVICES[group]
    measured = {r["device"] for r in doc["results"]}
    lines: list[str] = []
    for n, ub in enumerate(u for u in ubs if u in measured or u == ubs[0]):
        title = GROUP_TITLES[group] if n == 0 else f"{group}: {base} vs {ub}"
        lines += _pair_tables(doc, group, base, ub, title)
    return lines


def _pair_tables(doc: dict[str, Any], group: str, base: str, ub: str,
                 title: str) -> list[str]:
    idx = index_results(doc)
    keys = sorted({(r["workload"], int(r["queues"])) for r in doc["results"]
                   if r["group"] == group and r["device"] in (base, ub)},
                  key=lambda k: ([w for w, _ in _workloads(doc)].index(k[0]), k[1]))
    labels = dict(_workloads(doc))
    perf_rows, lat_rows = [], []
    for w, q in keys:
        b, u = idx.get((base, w, q)), idx.get((ub, w, q))
        bi, ui = _iops(idx, (base, w, q)), _iops(idx, (ub, w, q))
        bb = float(b["bw_mib_s"]) if b is not None and _ok(b) else None
        ubw = float(u["bw_mib_s"]) if u is not None and _ok(u) else None
        perf_rows.append([labels[w], str(q), _cell(b, _fmt_iops(bi)), _cell(u, _fmt_iops(ui)),
                          _fmt_ratio(ratio(ui, bi)), _cell(b, _fmt_bw(bb)),
                          _cell(u, _fmt_bw(ubw)), _fmt_ratio(ratio(ubw, bb))])

        lat_rows.append([labels[w], str(q), _trio(idx, (base, w, q)), _trio(idx, (ub, w, q)),
                         _fmt_ratio(ratio(_lat(idx, (ub, w, q), "p50"),
                                          _lat(idx, (base, w, q), "p50"))),
                         _fmt_ratio(ratio(_lat(idx, (ub, w, q), "p99"),
                                          _lat(idx, (base, w, q), "p99")))])
    lines = [f"### {title}", ""]
    lines += _table(["workload", "queues", f"{base} IOPS", f"{ub} IOPS", "ratio",
                     f"{base} MiB/s", f"{ub} MiB/s", "ratio"], perf_rows,
                    ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])
    lines += ["", "Latency (µs, p50 / p99 / p99.9; ratio: ublkml ÷ baseline, lower is better):",
              ""]
    lines += _table(["workload", "queues", f"{base}", f"{ub}", "p50 ratio", "p99 ratio"],
                    lat_rows)
    return [*lines, ""]


def _overhead_table(doc: dict[str, Any]) -> list[str]:
    """The overhead group round by round, then the medians the goals compare.

    A column per "on" side that the results have (results from before the
    monitor was measured have no monitor column).
    """
    recs = [r for r in doc.get("results", []) if r["group"] == "overhead"]
    if not recs:
        return []
    by: dict[tuple[int, str], dict[str, Any]] = {
        (int(r.get("round", 0)), r["device"]): r for r in recs}
    on = [d for d in OVERHEAD_ON if any(r["device"] == d for r in recs)]
    rows = []

    def row(label: str, off: float | None, cells: list[tuple[str, float | None]]) -> list[str]:
        out = [label, cells[0][0]]
        for text, value in cells[1:]:
            out += [text, _fmt_ratio(ratio(value, off))]
        return out

    for rnd in sorted({k[0] for k in by}):
        cells = []
        for dev in (OVERHEAD_OFF, *on):
            rec = by.get((rnd, dev))
            value = float(rec["iops"]) if rec is not None and _ok(rec) else None
            cells.append((_cell(rec, _fmt_iops(value)), value))
        rows.append(row(str(rnd + 1), cells[0][1], cells))
    medians = [median_iops(doc, d) for d in (OVERHEAD_OFF, *on)]
    rows.append(row("**median**", medians[0], [(_fmt_iops(m), m) for m in medians]))
    # Paired: each round's on ÷ off, then the median; robust to a drift of the
    # machine's speed across rounds, which moves both sides of a round alike.
    paired = ["median of the rounds' ratios", ""]
    for dev in on:
        rs = []
        for rnd in sorted({k[0] for k in by}):
            a, b = by.get((rnd, dev)), by.get((rnd, OVERHEAD_OFF))
            if a is not None and b is not None and _ok(a) and _ok(b):
                r = ratio(float(a["iops"]), float(b["iops"]))
                if r is not None:
                    rs.append(r)
        paired += ["", _fmt_ratio(statistics.median(rs)) if rs else "n/a"]
    rows.append(paired)
    counted = [int(r["accounting"]["ios_counted"]) for r in recs
               if _ok(r) and isinstance(r.get("accounting"), dict)
               and r["accounting"].get("ios_counted") is not None]
    attach = sorted({str(r["accounting"].get("attach")) for r in recs
                     if _ok(r) and isinstance(r.get("accounting"), dict)})
    sides = ["the plain device", *(f"the same device with {OVERHEAD_LABELS[d]}"
                                   if d != "ublkml-null-score" else "the scoring device"
                                   for d in on)]
    title = " vs ".join(["ublkml null plain", *(
        {"ublkml-null-acct": "eBPF accounting on", "ublkml-null-score": "--score",
         "ublkml-null-monitor": "drive monitor on"}[d] for d in on)])
    lines = [f"### overhead: {title} (4k randread QD32, 1 queue)", "",
             "Each round measures " + ", ".join(sides[:-1])
             + ("," if len(sides) > 2 else "") + f" and {sides[-1]}, " + (
                 "in an order that rotates from round to round"
                 if doc.get("meta", {}).get("overhead_order") == "rotated" else
                 "always in that order (the place in the round can bias the ratios)") +
             "; ratios are on ÷ the plain device of the same round, and of the medians.", ""]
    header = ["round", f"{OVERHEAD_OFF} IOPS"]
    for d in on:
        header += [f"{OVERHEAD_LABELS[d]} IOPS", "ratio"]
    lines += _table(header, rows)
    if counted:
        lines += ["", f"The accounting ({', '.join(attach)}) counted "
                  f"{', '.join(f'{c:,}' for c in counted)} I/Os in its rounds "
                  "(ramp included)."]
    lines += _monitor_lines([r for r in recs if _ok(r) and isinstance(r.get("monitor"), dict)])
    lines += _bpf_cost_lines(doc.get("meta", {}).get("bpf_cost"))
    return [*lines, ""]


def _monitor_lines(recs: list[dict[str, Any]]) -> list[str]:
    """What the monitor did in its rounds (the runner's ``monitor`` field)."""
    if not recs:
        return []
    mons = [r["monitor"] for r in recs]
    sources = ", ".join(sorted({str(m.get("source")) for m in mons}))
    nice = ", ".join(sorted({str(m.get("nice")) for m in mons}))
    ticks = ", ".join(str(m.get("ticks")) for m in mons)
    samples = ", ".join(str(m.get("samples")) for m in mons)
    tick_ms = [float(m["tick_ms_p50"]) for m in mons if m.get("tick_ms_p50") is not None]
    cpu = [(float(m["cpu_s"]), float(m.get("cpu_share") or 0.0)) for m in mons
           if m.get("cpu_s") is not None]
    text = (f"The monitor ({sources}, nice {nice}) ticked {ticks} times in its rounds, "
            f"with I/O in {samples} intervals of its last window")
    if tick_ms:
        text += f"; a tick took {statistics.median(tick_ms):.1f} ms (median of the p50s)"
    if cpu:
        text += ("; its CPU time while measured: "
                 + ", ".join(f"{c:.2f} s ({share:.1%} of a CPU)" for c, share in cpu))
    return ["", text + "."]


def _bpf_cost_lines(cost: Any) -> list[str]:
    """The kernel's own timing of the accounting programs (bpf_stats), if measured."""
    if not isinstance(cost, dict):
        return []
    if "error" in cost:
        return ["", f"Cost per I/O by bpf_stats: not measured ({cost['error']})."]
    progs = ", ".join(f"{name} {p['run_time_ns'] / max(p['run_cnt'], 1):,.0f} ns x "
                      f"{p['run_cnt']:,}" for name, p in sorted(cost["programs"].items())
                      if p["run_cnt"])
    return ["", f"Cost per I/O by the kernel's own count (`kernel.bpf_stats_enabled`, a "
            f"separate measurement of the same device): {cost['ns_per_io']:,.0f} ns of eBPF "
            f"per I/O ({progs}; {cost['ios']:,} I/Os), {cost['cpu_share']:.2%} of one CPU "
            f"at {cost['iops']:,.0f} IOPS. If the programs ran on the bottleneck thread "
            f"only, they would cost at most that share of its throughput: an implied "
            f"ratio of at least {1 / (1 + cost['cpu_share']):.3f}."]


def _trio(idx: dict[Key, dict[str, Any]], key: Key) -> str:
    """``p50 / p99 / p99.9`` of one record, or why there is none."""
    return _cell(idx.get(key), " / ".join(_fmt_us(_lat(idx, key, p))
                                          for p in ("p50", "p99", "p99.9")))


def _scaling_table(doc: dict[str, Any]) -> list[str]:
    idx = index_results(doc)
    rows = []
    for group in ("null", "loop", "python"):
        for dev in GROUP_DEVICES[group]:
            q1, q2 = idx.get((dev, HEADLINE, 1)), idx.get((dev, HEADLINE, 2))
            if q1 is None and q2 is None:
                continue
            a, b = _iops(idx, (dev, HEADLINE, 1)), _iops(idx, (dev, HEADLINE, 2))
            rows.append([dev, _cell(q1, _fmt_iops(a)), _cell(q2, _fmt_iops(b)),
                         _fmt_ratio(ratio(b, a))])
    if not rows:
        return []
    return ["### Queue scaling (4k randread QD32 per job; 2 queues = 2 pinned fio jobs)", "",
            *_table(["device", "1 queue IOPS", "2 queues IOPS", "2q ÷ 1q"], rows), ""]


def _profile_table(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc.get("results", []):
        prof = r.get("profile")
        if not prof:
            continue
        top = ", ".join(f"{t['name']} {float(t['user_s']) + float(t['sys_s']):.1f}s"
                        for t in prof.get("threads", [])[:3])
        util = prof.get("cpu_util")
        per_io = prof.get("cpu_us_per_io")
        rows.append([r["device"], r.get("label", r["workload"]), str(r["queues"]),
                     "-" if util is None else f"{util:.2f}",
                     "-" if per_io is None else f"{per_io:.1f}",
                     f"{prof['user_s']:.1f} / {prof['sys_s']:.1f}", top])
    if not rows:
        return []
    return ["## Server CPU profile (--profile)", "",
            "CPU time of the serving process (ublkml daemon or nbdkit) during each "
            "measurement, from /proc; CPU µs per I/O is approximate (the ramp and fio's "
            "start-up are in the wall time).", "",
            *_table(["device", "workload", "queues", "CPUs busy", "CPU µs / I/O",
                     "user / sys s", "busiest threads"], rows,
                    ["---", "---", "---:", "---:", "---:", "---:", "---"]), "",
            *_samples_section(doc)]


def _shares(items: list[dict[str, Any]], n: int) -> str:
    return "<br>".join(f"{100 * float(i['share']):.0f}% `{i['frame']}`" for i in items[:n]) or "-"


def _samples_section(doc: dict[str, Any]) -> list[str]:
    """Where the server's time goes, from py-spy's samples (bench/sampler.py)."""
    rows, errors = [], []
    for r in doc.get("results", []):
        smp = (r.get("profile") or {}).get("samples")
        if not smp:
            continue
        what = f"{r['device']} {r.get('label', r['workload'])} q{r['queues']}"
        if "error" in smp:
            errors.append(f"- {what}: {smp['error']}")
            continue
        wait = smp.get("waiting_share")
        rows.append([what, str(smp["samples"]), "-" if wait is None else f"{100 * wait:.0f}%",
                     _shares(smp.get("self", []), 5), _shares(smp.get("python", []), 4)])
    if not rows and not errors:
        return []
    out = ["### Where the time goes (py-spy, Python and native frames)", "",
           "Samples of every server thread at 100 Hz during the measurement. *waiting*: "
           "samples in a blocking call (io_uring_enter, futex, poll...); *on CPU, by leaf*: "
           "the innermost function of the other samples; *Python, inclusive*: Python "
           "functions anywhere on those stacks. Shares are of all samples. The sampler "
           "pauses the server: these runs' IOPS are lower than unprofiled ones.", ""]
    if rows:
        out += _table(["case", "samples", "waiting", "on CPU, by leaf", "Python, inclusive"],
                      rows, ["---", "---:", "---:", "---", "---"])
    return [*out, "", *errors, ""] if errors else [*out, ""]


def _devices_section(doc: dict[str, Any]) -> list[str]:
    meta = doc.get("meta", {})
    attrs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in doc.get("results", []):
        if r.get("device_attrs"):
            attrs.setdefault(r["device"], {}).setdefault(int(r["queues"]), r["device_attrs"])
    lines = ["## Devices", ""]
    for name, info in meta.get("devices", {}).items():
        if name not in attrs and not any(r["device"] == name for r in doc.get("results", [])):
            continue
        facts = []
        for q, a in sorted(attrs.get(name, {}).items()):
            bits = [f"{k}={a[k]}" for k in ("hw_queues", "scheduler", "direct_io", "block_size",
                                            "connections") if k in a and a[k] is not None]
            facts.append(f"q{q}: " + ", ".join(bits))
        extra = f" ({'; '.join(facts)})" if facts else ""
        lines.append(f"- **{name}**: {info.get('description', '')}{extra}")
    backing = meta.get("loop_backing")
    if backing:
        lines.append(f"- loop backing file: {backing['size'] >> 20} MiB on "
                     f"{backing['filesystem']}"
                     + (f" on {backing['device']}" if backing.get("device") else "")
                     + f", O_DIRECT {'supported' if backing['o_direct'] else 'NOT supported'}"
                     + (f" (fallback: {backing['fallback']})" if backing.get("fallback") else ""))
    return [*lines, ""]


def _header(doc: dict[str, Any]) -> list[str]:
    m = doc.get("meta", {})
    vm = m.get("vm") or {}
    host = m.get("host") or {}
    if m.get("environment") == "vm":
        where = (f"qemu test bed ({vm.get('accel', 'tcg').upper()}, {m.get('cpus')} vCPUs, "
                 f"{m.get('memory_mib')} MiB), guest kernel {m.get('kernel')}")
        if host:
            where += f"; host kernel {host.get('kernel')}, {host.get('cpus')} CPUs"
    else:
        where = f"native, kernel {m.get('kernel')}, {m.get('cpus')} CPUs"
    lines = [
        "# ublkml benchmark report",
        "",
        f"- date: {m.get('date')}" + (f", commit {m['git_commit']}" if m.get("git_commit")
                                        else ""),
        f"- where: {where}",
        f"- fio: {m.get('fio_version')}, io_uring, O_DIRECT, {m.get('runtime_s'):g} s per "
        f"job after {m.get('ramp_s'):g} s ramp" + (" (**--quick**: a smoke test, not figures "
                                                   "to quote)" if m.get("quick") else ""),
        f"- measuring took {float(m.get('elapsed_s', 0)) / 60:.1f} min"
        + (f" (VM total {float(vm['total_s']) / 60:.1f} min, boot {vm['boot_s']:.0f} s)"
           if vm.get("total_s") else ""),
    ]
    if m.get("git_dirty"):
        lines.append(f"- working tree differs from the commit in: {', '.join(m['git_dirty'])}")
    engines = sorted({str(r["device_attrs"]["engine"]) for r in doc.get("results", [])
                      if (r.get("device_attrs") or {}).get("engine")})
    if m.get("engine") or engines:
        note = " (**changed during the run**)" if len(engines) > 1 else ""
        lines.append(f"- ublkml engine build: {', '.join(engines) or m.get('engine')}{note}")
    if m.get("poll_us") is not None:
        lines.append(f"- every ublkml device with hybrid polling: `--poll-us {m['poll_us']}`")
    if m.get("skipped_groups"):
        lines.append(f"- skipped groups: {', '.join(m['skipped_groups'])}")
    if m.get("interrupted"):
        lines.append("- **the run was interrupted: results are partial**")
    if host:
        before = host.get("loadavg_before") or [0.0]
        after = host.get("loadavg_after") or [0.0]
        during = host.get("during") or {}
        text = (f"- noise: host load average {before[0]:.2f} before, {after[0]:.2f} after")
        if during:
            text += (f", {during['loadavg_mean']:.2f} on average during the run (max "
                     f"{during['loadavg_max']:.2f}); another qemu process "
                     f"was running in {during['other_qemu_share']:.0%} of "
                     f"{during['samples']} samples (at most {during['other_qemu_max']} at once)")
        else:
            text += (f"; other qemu processes on the host: "
                     f"{host.get('other_qemu_before', '?')} before, "
                     f"{host.get('other_qemu_after', '?')} after")
        lines.append(text)
    if m.get("environment") == "vm":
        lines += ["", "Absolute figures under software emulation (TCG) mean little; the "
                  "ratios between devices measured in this one run are what count. On a "
                  "2-CPU machine shared with other VMs, expect a few percent of noise "
                  "between runs."]
    return [*lines, ""]


def render_markdown(doc: dict[str, Any], plots: Sequence[str] = (),
                    plot_note: str = "") -> str:
    """The whole report as Markdown (``plots``: PNG file names beside it)."""
    results = doc.get("results", [])
    goals = check_goals(doc)
    lines = _header(doc)
    counts = {s: sum(1 for g in goals if g.status == s) for s in ("PASS", "FAIL", "n/a")}
    lines += ["## Targets", "",
              f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} n/a "
              "(n/a: a figure it needs was not measured or failed).", ""]
    rows = []
    for g in goals:
        cmp = "> " if g.goal.kind == "scaling" else ("<= " if g.goal.kind == "latency_ratio"
                                                     else ">= ")
        rows.append([g.goal.text, g.detail or "-", _fmt_ratio(g.ratio),
                     f"{cmp}{g.goal.threshold:g}", f"**{g.status}**"])
    lines += _table(["goal", "measured", "ratio", "needed", "result"], rows,
                    ["---", "---", "---:", "---:", "---"])
    lines += [""]
    lines += [f"- {g.status}: {g.goal.text}: ratio {_fmt_ratio(g.ratio)}"
              + (f" ({g.detail})" if g.detail else "") for g in goals]
    lines += ["", "## Results", "",
              "Ratio columns: ublkml ÷ its baseline on the same workload and queue count "
              "(higher is better for IOPS and MiB/s). Queue depth is per fio job; with 2 "
              "queues there are 2 jobs, one pinned to each CPU. `n/a`: the baseline has no "
              "such configuration; `error`: see Errors below."
              + (f" The goals' cases (4k randread QD32 on 1 and 2 queues, QD1 on 1 queue) "
                 f"ran {doc['meta']['goal_rounds']} rounds, baseline and ublkml side by "
                 "side in each; their cells are medians over the rounds (each percentile's "
                 "median)." if int(doc.get("meta", {}).get("goal_rounds", 1)) > 1 else ""),
              ""]
    for group in ("null", "loop", "python"):
        if any(r["group"] == group for r in results):
            lines += _group_tables(doc, group)
    lines += _overhead_table(doc)
    lines += _scaling_table(doc)
    lines += _profile_table(doc)
    lines += _devices_section(doc)
    errors = [r for r in results if r.get("status") == "error"]
    if errors:
        lines += ["## Errors", ""]
        lines += [f"- {r['device']} {r.get('label', r['workload'])} q{r['queues']}"
                  + (f" round {int(r['round']) + 1}" if "round" in r else "")
                  + f": {r.get('error')}" for r in errors]
        lines += [""]
    if plots or plot_note:
        lines += ["## Plots", ""]
        if plot_note:
            lines += [plot_note, ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        lines += [""]
    lines += ["See docs/benchmarks.md for what is measured and how to read this report.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _save_plot(plt: Any, fig: Any, ax: Any, outdir: Path, name: str) -> str:
    """Finish one chart (legend, layout), write it as PNG and free it; its file name."""
    ax.legend()
    fig.tight_layout()
    fig.savefig(outdir / name, dpi=100)
    plt.close(fig)
    return name


def make_plots(doc: dict[str, Any], outdir: Path) -> list[str]:
    """PNG charts in ``outdir``; their file names.  Raises ImportError without matplotlib.

    Per workload: IOPS by device (a bar per queue count), and latency
    percentiles by device (1 queue).  Log scales: the devices span two orders
    of magnitude (nbdkit's Python plug-in vs null_blk).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; also the only backend that is always there
    import matplotlib.pyplot as plt

    idx = index_results(doc)
    devices = [d for g in ("null", "loop", "python") for d in GROUP_DEVICES[g]
               if any(k[0] == d for k in idx)]
    files: list[str] = []
    for w, label in _workloads(doc):
        if not any(_iops(idx, (d, w, q)) is not None for d in devices for q in (1, 2)):
            continue  # nothing measured here (e.g. only the overhead group ran)
        # IOPS, grouped by device, one bar per queue count.
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.38
        missing: list[tuple[float, str]] = []
        for j, q in enumerate((1, 2)):
            xs, ys = [], []
            for i, d in enumerate(devices):
                v = _iops(idx, (d, w, q))
                x = i + (j - 0.5) * width
                if v is not None:
                    xs.append(x)
                    ys.append(v)
                elif (d, w, q) in idx:  # say why the bar is missing
                    missing.append((x, _cell(idx[(d, w, q)], "")))
            bars = ax.bar(xs, ys, width, label=f"{q} queue{'s' if q > 1 else ''}")
            ax.bar_label(bars, labels=[f"{y / 1000:.1f}k" if y >= 1000 else f"{y:.0f}"
                                       for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(devices)), devices, rotation=15)
        ax.set_yscale("log")
        bottom = ax.get_ylim()[0]
        for x, why in missing:
            ax.text(x, bottom * 1.15, why, ha="center", va="bottom", fontsize=8,
                    color="grey")
        ax.set_ylabel("IOPS (log scale)")
        ax.set_title(f"IOPS: {label}")
        files.append(_save_plot(plt, fig, ax, outdir, f"iops-{w}.png"))

        # Latency percentiles with one queue.
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.27
        for j, p in enumerate(("p50", "p99", "p99.9")):
            xs, ys = [], []
            for i, d in enumerate(devices):
                v = _lat(idx, (d, w, 1), p)
                if v is not None:
                    xs.append(i + (j - 1) * width)
                    ys.append(v)
            ax.bar(xs, ys, width, label=p)
        ax.set_xticks(range(len(devices)), devices, rotation=15)
        ax.set_yscale("log")
        ax.set_ylabel("latency, µs (log scale)")
        ax.set_title(f"Latency percentiles, 1 queue: {label}")
        files.append(_save_plot(plt, fig, ax, outdir, f"latency-{w}.png"))
    return files


def write_report(doc: dict[str, Any], outdir: Path, *, plots: bool = True,
                 out: Path | None = None) -> Path:
    """Plots (if wanted and matplotlib is there) and report.md in ``outdir``."""
    files: list[str] = []
    note = ""
    if plots:
        try:
            files = make_plots(doc, outdir)
        except ImportError:
            note = ("Plots skipped: matplotlib is not installed "
                    "(`pip install 'ublkml[bench]'` or `pip install matplotlib`).")
    path = out or outdir / "report.md"
    path.write_text(render_markdown(doc, files, note))
    return path


if __name__ == "__main__":
    from ublk_driver.core.cli import main

    sys.exit(main(["bench", "report", *sys.argv[1:]]))
