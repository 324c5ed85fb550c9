"""bench.engine_ab without a kernel: the round order, the medians and ratios, the trees'
checks, which engine a server maps, and the command's errors.

The records summarized here are made up (the fio figures are what is not under
test: the arithmetic over them is); the measurement itself is run for real in
the test bed (docs/benchmarks.md, Engine A/B).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import engine_ab
from bench.engine_ab import (
    LABELS,
    SLOTS,
    WORKLOAD_NAMES,
    AbError,
    Tree,
    check_mapping,
    check_tree,
    check_trees,
    check_unchanged,
    format_table,
    mapped_engines,
    plan,
    summarize,
)
from ublk_driver.core import cli
from ublk_driver.core.cli import UsageError

ENGINE = "_ublkml_cffi.abi3.so"


def make_tree(root: Path, *, engine: bool = True, stale: bool = False) -> Path:
    """A directory shaped like a checkout: sources and, if asked, a compiled engine
    (a few bytes: its content is only hashed here, never loaded)."""
    csrc = root / "ublk_driver" / "csrc"
    csrc.mkdir(parents=True)
    (root / "ublk_driver" / "__init__.py").write_text("")
    (csrc / "queue.c").write_text("int x;\n")
    if engine:
        so = root / "ublk_driver" / ENGINE
        so.write_bytes(b"engine of " + root.name.encode())
        src, built = (so, csrc / "queue.c") if stale else (csrc / "queue.c", so)
        os.utime(src, (1_000_000, 1_000_000))
        os.utime(built, (2_000_000, 2_000_000))
    return root


# ---------------------------------------------------------------------------
# The order
# ---------------------------------------------------------------------------


def test_slots_are_the_kernel_devices_and_each_tree_per_target() -> None:
    assert SLOTS == ("null_blk", "ublkml-null-before", "ublkml-null-after",
                     "kernel-loop", "ublkml-loop-before", "ublkml-loop-after")
    assert WORKLOAD_NAMES == ("4k-randread-qd32", "4k-randread-qd1")


@given(st.integers(min_value=1, max_value=24))
def test_every_round_measures_every_device_with_each_job_once(rounds: int) -> None:
    steps = plan(rounds)
    assert len(steps) == rounds * len(SLOTS) * len(WORKLOAD_NAMES)
    for r in range(rounds):
        mine = [s for s in steps if s.round == r]
        assert sorted((s.device, s.workload) for s in mine) == sorted(
            itertools.product(SLOTS, WORKLOAD_NAMES))
        # A job's six measurements are contiguous, in the same device order
        first, second = mine[:len(SLOTS)], mine[len(SLOTS):]
        assert len({s.workload for s in first}) == len({s.workload for s in second}) == 1
        assert [s.device for s in first] == [s.device for s in second]
    # rounds run in order
    assert [s.round for s in steps] == sorted(s.round for s in steps)


def test_the_first_job_alternates_between_rounds() -> None:
    firsts = [plan(4)[r * 12].workload for r in range(4)]
    assert firsts == ["4k-randread-qd32", "4k-randread-qd1"] * 2


def test_six_rounds_balance_places_and_neighbours() -> None:
    """A Williams design: over six rounds each device takes every place once and
    comes right after every other device once."""
    orders = [[s.device for s in plan(6) if s.round == r][:len(SLOTS)] for r in range(6)]
    for place in range(len(SLOTS)):
        assert {o[place] for o in orders} == set(SLOTS)
    pairs = [p for o in orders for p in itertools.pairwise(o)]
    assert len(pairs) == len(set(pairs)) == len(SLOTS) * (len(SLOTS) - 1)


def test_plan_needs_a_round() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        plan(0)


def test_five_rounds_of_ten_seconds_fit_in_twenty_five_minutes() -> None:
    assert engine_ab.estimate_seconds(5, 10, 2) + 60 <= 25 * 60


# ---------------------------------------------------------------------------
# Medians and ratios
# ---------------------------------------------------------------------------


def rec(device: str, workload: str, rnd: int, iops: float, p99: float = 100.0,
        status: str = "ok") -> dict[str, Any]:
    r: dict[str, Any] = {"device": device, "workload": workload, "round": rnd,
                         "status": status}
    if status == "ok":
        r.update(iops=iops, lat_us={"p50": p99 / 2, "p99": p99, "p99.9": p99 * 2})
    else:
        r["error"] = "unverified engine"
    return r


# IOPS per round of each device, for the QD32 job (QD1: a tenth of it)
FIGURES = {
    "null_blk": [100.0, 120.0, 80.0],
    "ublkml-null-before": [50.0, 70.0, 60.0],
    "ublkml-null-after": [66.0, 54.0, 90.0],
    "kernel-loop": [40.0, 20.0, 30.0],
    "ublkml-loop-before": [30.0, 30.0, 30.0],
    "ublkml-loop-after": [45.0, 15.0, 30.0],
}


def records() -> list[dict[str, Any]]:
    out = []
    for device, values in FIGURES.items():
        for n, v in enumerate(values):
            out.append(rec(device, "4k-randread-qd32", n, v, p99=1000.0 / v))
            out.append(rec(device, "4k-randread-qd1", n, v / 10, p99=10000.0 / v))
    return out


def test_ratios_are_of_the_medians_as_the_bench_computes_them() -> None:
    s = summarize(records())
    c = s["comparisons"]
    assert list(c) == ["null-qd32", "null-qd1", "loop-qd32", "loop-qd1"]
    null = c["null-qd32"]
    assert null["baseline"] == "null_blk"
    assert s["medians"]["null_blk"]["4k-randread-qd32"]["iops"] == 100.0
    assert null["before"]["ratio"] == pytest.approx(60 / 100)
    assert null["after"]["ratio"] == pytest.approx(66 / 100)
    assert null["after_over_before"]["ratio"] == pytest.approx(66 / 60)
    assert null["after_over_before"]["iops"] == pytest.approx(66 / 60)
    # p99 of each round is 1000 / IOPS: the medians' ratio is before's over after's
    assert null["after_over_before"]["p99"] == pytest.approx((1000 / 66) / (1000 / 60))
    # the spread: each round's own ratio, taken within the round
    assert null["before"]["round_ratios"]["per_round"] == pytest.approx(
        [0.5, 70 / 120, 0.75], abs=1e-4)
    assert null["after_over_before"]["round_iops"]["per_round"] == pytest.approx(
        [66 / 50, 54 / 70, 1.5], abs=1e-4)
    assert null["after_over_before"]["round_iops"]["min"] == pytest.approx(54 / 70, abs=1e-4)
    loop = c["loop-qd1"]
    assert loop["before"]["ratio"] == pytest.approx(3.0 / 3.0)
    assert loop["after"]["round_ratios"]["median"] == pytest.approx(1.0)


def test_a_failed_round_is_no_figure() -> None:
    rs = records()
    # round 2 of ublkml-null-after QD32 failed: its medians come from rounds 0 and 1
    rs = [r for r in rs if not (r["device"] == "ublkml-null-after" and r["round"] == 2
                                and r["workload"] == "4k-randread-qd32")]
    rs.append(rec("ublkml-null-after", "4k-randread-qd32", 2, 0, status="error"))
    s = summarize(rs)
    m = s["medians"]["ublkml-null-after"]["4k-randread-qd32"]
    assert m["rounds_ok"] == 2 and m["iops"] == statistics.median([66.0, 54.0])
    ab = s["comparisons"]["null-qd32"]["after_over_before"]["round_iops"]["per_round"]
    assert len(ab) == 2


def test_a_device_without_a_round_has_no_ratio() -> None:
    rs = [r for r in records() if r["device"] != "kernel-loop"]
    c = summarize(rs)["comparisons"]["loop-qd32"]
    assert c["before"]["ratio"] is None and c["after"]["ratio"] is None
    assert c["after_over_before"]["ratio"] is None
    assert c["after_over_before"]["iops"] == pytest.approx(30 / 30)
    table = format_table(summarize(rs), 3)
    assert "n/a" in table


def test_the_table_shows_medians_ratios_and_rounds() -> None:
    table = format_table(summarize(records()), 3)
    lines = table.splitlines()
    assert lines[0].startswith("medians of 3 rounds")
    row = next(ln for ln in lines if ln.startswith("null-qd32"))
    assert row.split()[1:7] == ["100", "60", "66", "0.600", "0.660", "1.100"]
    assert row.split()[7:] == ["1.32", "0.77", "1.50"]
    assert any(ln.startswith("loop-qd1") for ln in lines)


# ---------------------------------------------------------------------------
# The trees
# ---------------------------------------------------------------------------


def test_a_tree_without_its_engine_says_how_to_build_it(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", engine=False)
    with pytest.raises(AbError, match=r"no compiled engine.*build it in place: cd .*/t && "
                                      r".* setup.py build_ext --inplace"):
        check_tree("before", tree)


def test_a_stale_engine_must_be_rebuilt(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", stale=True)
    with pytest.raises(AbError, match=r"--after .*older than ublk_driver/csrc/queue.c; "
                                      r"rebuild it: cd"):
        check_tree("after", tree)


def test_not_a_checkout_and_no_directory(tmp_path: Path) -> None:
    with pytest.raises(AbError, match="no such directory"):
        check_tree("before", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbError, match="not a checkout of ublkml"):
        check_tree("before", tmp_path / "empty")


def test_a_good_tree_and_what_it_records(tmp_path: Path) -> None:
    t = check_tree("before", make_tree(tmp_path / "b"))
    assert t.engine == tmp_path / "b" / "ublk_driver" / ENGINE
    info = t.info()
    assert info["commit"] is None  # not a git checkout
    assert info["engine"]["sha256"] == t.sha256() and len(t.sha256()) == 64
    assert t.env()["PYTHONPATH"] == str(tmp_path / "b")


def test_the_same_tree_twice_is_a_usage_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    with pytest.raises(UsageError, match="the same tree"):
        check_trees(tree, tmp_path / "t" / ".")


def test_the_trees_engines_must_be_the_measured_ones(tmp_path: Path) -> None:
    trees = [check_tree(label, make_tree(tmp_path / label)) for label in LABELS]
    doc = {"trees": {t.label: t.info() for t in trees}}
    assert check_unchanged(doc, trees) == []
    trees[1].engine.write_bytes(b"rebuilt")
    assert check_unchanged(doc, trees) == [
        f"the after tree's engine ({trees[1].engine}) is not the one measured: it was "
        "rebuilt during the run"]


def test_the_commit_recorded_is_the_checkouts() -> None:
    root = Path(engine_ab.__file__).resolve().parent.parent
    commit = engine_ab._git(root, "rev-parse", "HEAD")
    assert commit is not None and len(commit) == 40
    assert engine_ab._git(root / "no-such-dir", "rev-parse", "HEAD") is None


# ---------------------------------------------------------------------------
# Which engine a server maps
# ---------------------------------------------------------------------------


def maps_text(*paths: str) -> str:
    lines = ["55d0c0000000-55d0c0001000 r--p 00000000 00:1f 123 /usr/bin/python3.11",
             "7f0000000000-7f0000021000 rw-p 00000000 00:00 0 ",
             "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                  [stack]"]
    for i, p in enumerate(paths):
        lines += [f"7f10{i}0000000-7f10{i}0001000 r--p 00000000 00:2a 77 {p}",
                  f"7f10{i}0001000-7f10{i}0009000 r-xp 00001000 00:2a 77 {p}"]
    return "\n".join(lines) + "\n"


def test_mapped_engines_from_maps() -> None:
    assert mapped_engines(maps_text()) == []
    a = "/work/ab-before/ublk_driver/_ublkml_cffi.abi3.so"
    assert mapped_engines(maps_text(a)) == [a]
    spaced = "/tmp/a tree/ublk_driver/_ublkml_cffi.cpython-311-x86_64-linux-gnu.so"
    assert mapped_engines(maps_text(spaced, a + " (deleted)")) == [spaced, a + " (deleted)"]


def test_check_mapping(tmp_path: Path) -> None:
    before, after = (Tree(label, tmp_path / label, tmp_path / label / "ublk_driver" / ENGINE)
                     for label in LABELS)
    assert check_mapping([str(before.engine)], before, 42) == str(before.engine)
    with pytest.raises(AbError, match=r"runs .*/after/.*, not the before tree's engine"):
        check_mapping([str(after.engine)], before, 42)
    with pytest.raises(AbError, match="rebuilt during the run"):
        check_mapping([f"{before.engine} (deleted)"], before, 42)
    with pytest.raises(AbError, match="no compiled engine mapped"):
        check_mapping([], before, 42)
    with pytest.raises(AbError, match="2 engines mapped"):
        check_mapping([str(before.engine), str(after.engine)], before, 42)


def test_verify_engine_of_a_process_that_is_gone(tmp_path: Path) -> None:
    t = Tree("before", tmp_path, tmp_path / ENGINE)
    with pytest.raises(AbError, match="it is gone"):
        engine_ab.verify_engine(2**22 + 12345, t)


def test_verify_engine_of_a_process_that_maps_no_engine(tmp_path: Path) -> None:
    """This test process has no engine of a tree in tmp_path mapped."""
    t = Tree("before", tmp_path, tmp_path / ENGINE)
    with pytest.raises(AbError, match=f"server {os.getpid()}"):
        engine_ab.verify_engine(os.getpid(), t)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["bench", "engine-ab", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "--before DIR" in out and "/proc/PID/maps" in out


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(["--before", str(tmp_path)], capsys)
    assert code == 2 and "--after" in err
    code, _, err = run_cli(["--before", "a", "--after", "b", "--rounds", "0"], capsys)
    assert code == 2 and "rounds must be 1..100" in err
    good = make_tree(tmp_path / "g")
    code, _, err = run_cli(["--before", str(good), "--after", str(good), "--runtime", "0"],
                        capsys)
    assert code == 2 and "--runtime must be positive" in err


def test_a_bad_tree_is_one_line_before_anything_boots(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good, bare = make_tree(tmp_path / "good"), make_tree(tmp_path / "bare", engine=False)
    code, _, err = run_cli(["--before", str(bare), "--after", str(good),
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("ublkml: error: --before ")
    assert f"cd {bare} && {sys.executable} setup.py build_ext --inplace" in err
    assert not (tmp_path / "out").exists()
