"""The drive-verdicts file: what a watcher publishes and `ublkml status` reads (host only)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ublk_driver.admin.cli import _path_line
from ublk_driver.drive_verdicts import (
    STATES,
    DriveVerdict,
    read_verdicts,
    verdicts_path,
    write_verdicts,
)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
verdicts = st.builds(DriveVerdict, st.sampled_from(STATES), st.text(max_size=80),
                     st.none() | st.floats(0, 1))


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(names, verdicts, max_size=8))
def test_round_trip(tmp_path_factory: pytest.TempPathFactory,
                    drives: dict[str, DriveVerdict]) -> None:
    d = str(tmp_path_factory.mktemp("state"))
    write_verdicts("monitor", drives, d)
    back = read_verdicts(d)
    assert back is not None and back.by == "monitor" and back.pid == os.getpid()
    assert back.drives == drives and back.writer_alive()
    assert [p for p in os.listdir(d) if ".tmp" in p] == []


def test_unknown_state_is_refused() -> None:
    with pytest.raises(ValueError, match="one of ok, SLOW"):
        DriveVerdict("slow")


@pytest.mark.parametrize("text", ["", "{", "[]", '{"by": "m"}',
                                  '{"by": "m", "pid": 1, "updated": 0, "drives": {"a": {}}}',
                                  '{"by": "m", "pid": 1, "updated": 0, '
                                  '"drives": {"a": {"state": "bad"}}}'])
def test_a_broken_file_reads_as_none(tmp_path: Path, text: str) -> None:
    Path(verdicts_path(str(tmp_path))).write_text(text)
    assert read_verdicts(str(tmp_path)) is None


def test_none_without_a_file_and_stale_once_the_writer_is_gone(tmp_path: Path) -> None:
    assert read_verdicts(str(tmp_path)) is None
    gone = subprocess.Popen(["true"])
    gone.wait()
    Path(verdicts_path(str(tmp_path))).write_text(json.dumps(
        {"by": "monitor", "pid": gone.pid, "updated": 1.0,
         "drives": {"sda": {"state": "SLOW", "reason": "r", "score": 0.9}}}))
    v = read_verdicts(str(tmp_path))
    assert v is not None and v.drives["sda"] == DriveVerdict("SLOW", "r", 0.9)
    assert not v.writer_alive()


def test_status_line_shows_a_drive_verdict() -> None:
    path = {"index": 1, "name": "leg1", "backing": "/f/leg1.img",
            "drives": [{"name": "nvme0n1", "dev": "259:0",
                        "verdict": {"by": "monitor", "state": "SLOW", "score": 0.973,
                                    "current": True}},
                       {"name": "sda", "dev": "8:0",
                        "verdict": {"by": "monitor", "state": "ok", "score": None,
                                    "current": False}},
                       {"name": "sdb", "dev": "8:16"}]}
    assert _path_line(path) == ("path 1 leg1  /f/leg1.img -> nvme0n1 (259:0) [monitor: SLOW "
                                "0.97], sda (8:0) [monitor: ok, stale], sdb (8:16)")
