"""``ublkml status | fault | leg``: answers, exit codes, one-line errors.

The command runs for real (``python -m ublk_driver``); the server behind the
socket is this process's AdminServer in front of doubles.FakeServer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.ublk_driver.admin.doubles import Served, serve


def run(served: Served | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["UBLKML_STATE_DIR"] = served.state_dir if served else "/nonexistent-ublkml-state"
    return subprocess.run([sys.executable, "-m", "ublk_driver", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve() as s:
        yield s


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert text in proc.stderr
    assert "Traceback" not in proc.stderr
    if code == 1:
        assert len(proc.stderr.strip().splitlines()) == 1


def test_status_text_and_json(served: Served) -> None:
    proc = run(served, "status", "-n", "7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ublk device 7 (/dev/ublkb7): mirror 64M, 2 queue(s) x depth "
                                  "64, server pid")
    assert "queue 0: 7 I/Os, 0 errors, 5 batches\n" in proc.stdout
    assert ("queue 1: 2 I/Os, 2 errors, 1 batches (last error: ETIMEDOUT on WRITE at 4096); "
            "plug-in calls: 1 timed out, 1 stuck now, 0 returned late\n") in proc.stdout
    assert ("  path 0 leg0  /data/leg0.img -> sda (8:0)\n"
            "  path 1 leg1  /dev/shm/leg1.img -> no drive (/dev/shm/leg1.img is on tmpfs "
            "(device 0:27), a file system with no block device of its own)\n") in proc.stdout
    doc = json.loads(run(served, "status", "-n", "7", "--json").stdout)
    assert doc["dev_id"] == 7 and len(doc["legs"]) == 2
    assert doc["paths"][0] == {"index": 0, "name": "leg0", "backing": "/data/leg0.img",
                               "drives": [{"name": "sda", "dev": "8:0"}], "no_drive": None}
    assert [p["index"] for p in doc["paths"]] == [0, 1]


def test_leg_list_demote_fail_promote(served: Served) -> None:
    proc = run(served, "leg", "-n", "7", "demote", "1")
    assert proc.returncode == 0 and proc.stdout.strip() == "device 7 leg 1: demoted (was active)"
    lines = run(served, "leg", "-n", "7", "list").stdout.splitlines()
    assert lines[0].split() == ["LEG", "STATE", "DIRTY", "READS", "WRITES", "ERRORS", "PROBES"]
    assert lines[2].split()[:2] == ["1", "demoted"]
    proc = run(served, "leg", "-n", "7", "promote", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["state"] == "active" and out["job"]["state"] == "done"
    proc = run(served, "leg", "-n", "7", "promote", "1", "--no-wait")
    assert "promotion started (job" in proc.stdout
    assert json.loads(run(served, "leg", "-n", "7", "list", "--json").stdout)["legs"][1][
        "state"] == "active"
    assert run(served, "leg", "-n", "7", "fail", "0").stdout.strip() == \
        "device 7 leg 0: failed (was active)"


def test_failed_promotion_exits_1(served: Served) -> None:
    served.fake.promote_error = "leg 0 unreadable"
    try:
        proc = run(served, "leg", "-n", "7", "promote", "0")
    finally:
        served.fake.promote_error = None
    one_line_error(proc, 1, "ublkml: error: promoting leg 0 failed: leg 0 unreadable")


def test_fault_set_and_clear(served: Served) -> None:
    proc = run(served, "fault", "set", "-n", "7", "--path", "1", "delay=2ms,slow=10")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('device 7 path 1: fault set {"burst_on_ms": 0, "burst_peri')
    doc = json.loads(run(served, "status", "-n", "7", "--json").stdout)
    assert doc["faults"]["1"]["delay_us"] == 2000 and doc["faults"]["1"]["slow"] == 10
    assert "fault on path 1:" in run(served, "status", "-n", "7").stdout
    out = json.loads(run(served, "fault", "clear", "-n", "7", "--json").stdout)
    assert 1 in out["cleared"]
    proc = run(served, "fault", "clear", "-n", "7", "--path", "0")
    assert proc.stdout.strip() == "device 7: faults cleared on path(s) 0"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["fault", "set", "-n", "7", "slow=0.5"], 2, "bad fault spec 'slow=0.5': fault: slow must"),
    (["fault", "set", "-n", "7", "bogus"], 2, "bad fault spec 'bogus': fault spec item"),
    (["fault", "set", "-n", "7", "--path", "5", "delay=1ms"], 1,
     "ublkml: error: no leg 5: the mirror has legs 0..1"),
    (["status"], 2, "the following arguments are required: -n/--number"),
    (["status", "-n", "x"], 2, "device id must be an integer, got 'x'"),
    (["status", "-n", "-1"], 2, "device id must be 0..1048575"),
    (["status", "-n", "7", "--timeout", "0"], 2, "positive number of seconds"),
    (["leg", "-n", "7"], 2, "the following arguments are required: verb"),
    (["leg", "-n", "7", "explode", "1"], 2, "invalid choice: 'explode'"),
    (["leg", "-n", "7", "demote"], 2, "`leg demote` needs LEG"),
    (["leg", "-n", "7", "demote", "-3"], 2, "leg must be 0 or more"),
    (["leg", "-n", "7", "demote", "one"], 2, "leg must be an integer"),
    (["leg", "-n", "7", "list", "1"], 2, "`leg list` takes no LEG"),
    (["leg", "-n", "7", "demote", "9"], 1, "ublkml: error: no leg 9: the mirror has legs 0..1"),
    (["fault"], 2, "the following arguments are required: VERB"),
    (["fault", "clear"], 2, "the following arguments are required: -n/--number"),
    (["fault", "clear", "-n", "7", "--path", "x"], 2, "path must be an integer"),
])
def test_bad_input(served: Served, args: list[str], code: int, message: str) -> None:
    one_line_error(run(served, *args), code, message)


def test_no_server_is_a_clear_error() -> None:
    proc = run(None, "status", "-n", "3")
    one_line_error(proc, 1, "ublkml: error: no admin socket for ublk device 3 "
                   "(/nonexistent-ublkml-state/3.sock): is the server running? see `ublkml list`")


@pytest.mark.parametrize("cmd", [["status"], ["fault", "set"], ["fault", "clear"], ["leg"]])
def test_help(cmd: list[str]) -> None:
    proc = run(None, *cmd, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: ublkml {' '.join(cmd)}") and "--json" in proc.stdout


def test_path_line_with_several_drives_and_no_backing() -> None:
    from ublk_driver.admin.cli import _path_line

    assert _path_line({"index": 0, "name": "python", "backing": None,
                       "drives": [{"name": "sda", "dev": "8:0"},
                                  {"name": "nvme0n1", "dev": "259:0"}],
                       "no_drive": None}) == "path 0 python  - -> sda (8:0), nvme0n1 (259:0)"
