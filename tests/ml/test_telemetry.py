"""Bad telemetry and label files: one clear line naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml.telemetry import TelemetryError, read_file, read_labels, read_tree
from tests.ml.helpers import ml_main

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
    ("unsorted", "ts,disk_id,throughput,latency\n60,d0,10,1\n0,d0,10,1\n",
     "line 3: ts goes backwards"),
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
