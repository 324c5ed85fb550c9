"""The telemetry reader: the published layout (nested, quoted, per-drive order, NA
counted) on a real subset, and bad files: one clear line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml import telemetry as T
from ml.telemetry import TelemetryError, read_file, read_labels, read_tree
from tests.ml.helpers import ml_main

SUBSET = Path(__file__).parent / "data" / "perseus-subset"

GOOD = "ts,disk_id,throughput,latency\n0,d0,10,100\n0,d1,12,110\n60,d0,11,105\n60,d1,9,98\n"

BAD = [
    ("empty", "", "empty file"),
    ("header only", "ts,disk_id,throughput,latency\n", "no data rows"),
    ("missing column", "ts,disk_id,latency\n0,d0,100\n", "missing column.*throughput"),
    ("nan", "ts,disk_id,throughput,latency\n0,d0,10,nan\n", "line 2: latency is 'nan'"),
    ("inf", "ts,disk_id,throughput,latency\n0,d0,inf,1\n", "line 2: throughput is 'inf'"),
    ("negative", "ts,disk_id,throughput,latency\n0,d0,10,-1\n", "latency is '-1'"),
    ("not a number", "ts,disk_id,throughput,latency\n0,d0,10,1\n60,d0,fast,1\n",
     "line 3: throughput 'fast' is not a number"),
    ("all NA", "ts,disk_id,throughput,latency\n0,d0,NA,1\n15,d0,2,\n",
     "no usable rows: all 2 data rows have a NA or empty"),
    ("all NA, quoted", '"ts","disk_id","throughput","latency"\n0,"d0",NA,NA\n',
     "no usable rows: all 1 data rows"),
    ("missing quoted column", '"ts","disk_id","latency"\n0,"d0",1\n',
     "missing column.*throughput"),
    ("NA disk", "ts,disk_id,throughput,latency\n0,,NA,1\n", "empty disk_id"),
    ("short row", "ts,disk_id,throughput,latency\n0,d0,10\n", "line 2: 3 fields"),
    ("empty disk", "ts,disk_id,throughput,latency\n0,,10,1\n", "empty disk_id"),
    ("binary", "\x00\x01\x02", "missing column"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    p = tmp_path / "h1" / "day.csv"
    p.parent.mkdir()
    p.write_text(text)
    with pytest.raises(TelemetryError, match=message) as e:
        read_tree(str(tmp_path))
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_cli_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "h1" / "day.csv"
    p.parent.mkdir()
    p.write_text("ts,disk_id,throughput,latency\n0,d0,10,nan\n")
    assert ml_main(["detect", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(p) in err[0] and "Traceback" not in err[0]


def test_empty_tree_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="no telemetry"):
        read_tree(str(tmp_path))
    with pytest.raises(TelemetryError, match="not a directory"):
        read_tree(str(tmp_path / "nope"))


def test_good_tree_merges_days_and_ignores_top_level_files(tmp_path: Path) -> None:
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "2024-01-02.csv").write_text(
        "latency,ts,disk_id,throughput,extra\n1,86400,d0,5,x\n2,86400,d1,5,y\n")
    (tmp_path / "h1" / "2024-01-01.csv").write_text(GOOD)
    (tmp_path / "labels.csv").write_text("host,disk_id\nh1,d1\n")
    (host,) = read_tree(str(tmp_path))
    assert host.host == "h1" and host.disk_ids == ("d0", "d1")
    assert list(host.ts) == [0, 0, 60, 60, 86400, 86400]
    assert list(host.drive) == [0, 1, 0, 1, 0, 1]
    assert list(host.latency[-2:]) == [1, 2]


def test_real_subset_as_published() -> None:
    """Two host-days of the Perseus data, byte for byte: nested hosts, quoted header,
    rows grouped per drive, 10 NA rows per file; sorted by time, NA counted."""
    hosts = read_tree(str(SUBSET))
    assert [h.host for h in hosts] == ["cluster_A/host_1", "cluster_C/host_21"]
    for h, rows in zip(hosts, (8640, 8652), strict=True):    # `wc -l` less the header
        assert h.disk_ids == tuple(sorted(f"disk{i}" for i in range(1, 13)))
        assert [(f.rows, f.dropped) for f in h.files] == [(rows, 10)]
        assert h.dropped == 10 and h.ts.size == rows - 10
        assert np.all(np.diff(h.ts) >= 0)                   # by time across drives
        assert np.bincount(h.drive).min() >= 700            # 12 drives, ~720 samples each
        assert np.isfinite(h.latency).all() and (h.throughput >= 0).all()
    na = T.dropped_rows(hosts)
    assert na["rows"] == 17292 and na["dropped"] == 20 and na["files"] == 2
    assert sorted(na["files_with_dropped"].values()) == [10, 10]
    assert read_labels(str(SUBSET / "slow_drive_info.csv")) == {
        ("cluster_C/host_21", "disk1"), ("cluster_C/host_21", "disk2")}


def test_fast_path_matches_the_csv_path_on_real_files() -> None:
    for p in sorted(SUBSET.rglob("*.csv")):
        if p.name == "slow_drive_info.csv":
            continue
        data = p.read_bytes()
        fast, slow = T._fast(str(p), data), T._slow(str(p), data)
        assert (fast.rows, fast.dropped) == (slow.rows, slow.dropped)
        assert fast.dropped == 10 and fast.rows in (8640, 8652)
        fd = [fast.disk_ids[i] for i in fast.drive]
        sd = [slow.disk_ids[i] for i in slow.drive]
        assert fd == sd
        for a in ("ts", "throughput", "latency"):
            np.testing.assert_array_equal(getattr(fast, a), getattr(slow, a))


rows_st = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["d0", "d1", "x y"]),
                             st.sampled_from(["1.5", "0", "NA", "", "25736557.1", "7e3"]),
                             st.sampled_from(["102.91", "NA", "3", " 4 ", ""])),
                   min_size=1, max_size=30)


@settings(max_examples=100, deadline=None)
@given(rows_st, st.booleans())
def test_fast_and_csv_paths_agree(rows: list[tuple[int, str, str, str]], quote: bool) -> None:
    """Any row order, quoted ids, NA and empty cells: both paths read the same rows
    and count the same drops (or refuse the same file)."""
    q = '"' if quote else ""
    text = f"{q}ts{q},{q}disk_id{q},{q}throughput{q},{q}latency{q}\n" + "".join(
        f"{t},{q}{d}{q},{a},{b}\n" for t, d, a, b in rows)
    data = text.encode()
    try:
        slow = T._slow("f.csv", data)
    except TelemetryError as e:
        with pytest.raises(TelemetryError) as fe:
            T.read_telemetry_bytes("f.csv", data)
        assert str(fe.value) == str(e)
        return
    fast = T.read_telemetry_bytes("f.csv", data)
    assert (fast.rows, fast.dropped) == (slow.rows, slow.dropped) == (
        len(rows), sum(1 for _, _, a, b in rows if a.strip() in T.NA_CELLS
                       or b.strip() in T.NA_CELLS))
    assert [fast.disk_ids[i] for i in fast.drive] == [slow.disk_ids[i] for i in slow.drive]
    np.testing.assert_array_equal(fast.latency, slow.latency)


def test_rows_in_any_order_are_sorted(tmp_path: Path) -> None:
    (tmp_path / "c" / "h").mkdir(parents=True)
    (tmp_path / "c" / "h" / "d.csv").write_text(
        "ts,disk_id,throughput,latency\n60,d0,10,1\n0,d0,10,2\n30,d1,NA,3\n30,d1,5,4\n")
    (host,) = read_tree(str(tmp_path))
    assert host.host == "c/h" and list(host.ts) == [0, 30, 60]
    assert list(host.latency) == [2, 4, 1] and host.dropped == 1


def test_labels(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("host,disk_id\nh1,d1\n\nh2,d0\n")
    assert read_labels(str(p)) == {("h1", "d1"), ("h2", "d0")}
    p.write_text("host,disk\nh1,d1\n")
    with pytest.raises(TelemetryError, match="host,disk_id"):
        read_labels(str(p))
    p.write_text("host,disk_id\nh1\n")
    with pytest.raises(TelemetryError, match="line 2"):
        read_labels(str(p))
    with pytest.raises(TelemetryError, match="cannot read"):
        read_labels(str(tmp_path / "nope.csv"))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(GOOD) - 1), st.text(max_size=5))
def test_corrupted_files_fail_cleanly(tmp_path: Path, pos: int, junk: str) -> None:
    p = tmp_path / "f.csv"
    p.write_text(GOOD[:pos] + junk + GOOD[pos + 1:])
    try:
        ts, disks, tput, lat = read_file(str(p))
    except TelemetryError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
    else:
        assert len(ts) == len(disks) == len(tput) == len(lat) >= 1
