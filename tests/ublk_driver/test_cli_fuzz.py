"""Hostile command lines: every outcome is exit 0, 1 or 2, and an error is one line.

Hypothesis builds argv for ``ublkml`` and its delegated groups (``agent``,
``model``, ``ml``) from the real options, plausible values and random text,
and runs ``ublkml``'s ``main`` in-process (fast).  The control device is pointed at a
path that does not exist, so device verbs fail exactly as on a machine without
``ublk_drv`` even where the driver is loaded; state directories are temporary.

Left out on purpose, because they do real, long work when their arguments are
valid: ``demo``, ``bench``, ``vm`` (boots qemu), ``agent run|start`` (serve
forever), ``ml train|synth`` (minutes of training; ``train reference`` writes
the packaged models).  argv cannot hold NUL bytes, so no token has one.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ublk_driver.control import Control
from ublk_driver.core.cli import main

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture
def hermetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No real driver, no real state: what a hostile argv can touch is a temp dir."""
    monkeypatch.setattr(Control.__init__, "__defaults__", (str(tmp_path / "no-ublk-control"),))
    monkeypatch.setenv("UBLKML_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("UBLKML_AGENT_DIR", str(tmp_path / "agent"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "d.csv").write_text("ts,disk_id,throughput,latency\n0,d0,1,nan\n")
    (tmp_path / "s.json").write_text('{"smartctl": {"exit_status": 2}}')
    old = signal.getsignal(signal.SIGPIPE)
    yield tmp_path
    signal.signal(signal.SIGPIPE, old)  # main() sets SIG_DFL for `| head`


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts; main() changes it
    return code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str], code: int, err: str) -> None:
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code:
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, code, err)
        assert lines[0].startswith("ublkml"), (argv, err)


# Random text: anything argv can carry (surrogates stand for undecodable bytes).
junk = st.text(st.characters(blacklist_characters="\x00", codec=None), max_size=12)
numbers = st.integers(-2**70, 2**70).map(str)
sizes = st.sampled_from(["0", "1", "512", "4096", "1000", "64M", "1G", "1T", "99999T",
                         "-1", "1.5G", "lots", "", " 4K ", "1KiB", "9" * 30])
paths = st.sampled_from(["disk.img", "odd.img", "missing.img", "/dev/null", "/dev/zero",
                         ".", "/", "bad.onnx", "h1", "s.json", "-", "--", "/proc/self/mem"])


def tokens(vocab: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.one_of(st.sampled_from(vocab), numbers, sizes, paths, junk), max_size=8)


MAIN_VERBS = ["add", "list", "del", "features", "--help", "-h", "nosuchverb", ""]
MAIN_OPTS = ["-t", "null", "mem", "loop", "python", "mirror", "-f", "--file", "--size", "-q",
             "--queues", "-d", "--depth", "-n", "--number", "--max-io", "--plugin",
             "--plugin-arg", "size=1M", "x=y", "=", "--buffered", "--read-only", "--score",
             "--foreground", "--json", "-v", "--verbose", "-a", "--all",
             "examples.ramdisk:RamDisk", "os:system", "nosuch:X", ":", "a.py:B",
             "--help"]


@FUZZ
@given(st.sampled_from(MAIN_VERBS), tokens(MAIN_OPTS))
def test_ublkml_argv(hermetic: Path, verb: str, rest: list[str]) -> None:
    argv = [verb, *rest]
    code, _, err = run_main(argv)
    check_outcome(argv, code, err)
    if verb in ("list", "features") and code == 1:
        assert "ublk driver is not loaded" in err  # the device verbs say what to do


AGENT_VERBS = ["add", "remove", "list", "watch", "unwatch", "mode", "stats", "recommend",
               "stop", "status", "--help", "bogus"]
AGENT_OPTS = ["ublk-server", "ml-extension", "pid=1", "pid=x", "queues=999999", "dev_id=0",
              "policy=remove", "policy=maybe", "mode=enforce", "model=m", "--json", "--mode",
              "observe", "recommend", "enforce", "--slow-us", "--ext", "1", "0", "loop0",
              "/dev/loop0", "7:0", "read_ahead_kb", "scheduler", "--confidence", "nan",
              "inf", "--ttl-ms", "--wait", "0.01", "--model", "--help"]


@FUZZ
@given(st.sampled_from(AGENT_VERBS), tokens(AGENT_OPTS))
def test_agent_argv(hermetic: Path, verb: str, rest: list[str]) -> None:
    argv = ["agent", verb, *rest]
    code, _, err = run_main(argv)
    check_outcome(argv, code, err)


ML_VERBS = [("model", "list"), ("model", "validate"), ("model", "use"), ("model", "bogus"),
            ("ml", "detect"), ("ml", "smart"), ("ml", "bogus"), ("model", "--help"),
            ("ml", "--help")]
ML_OPTS = ["--kind", "fail_slow", "failure", "--json", "-n", "--number", "--labels",
           "--model", "--method", "model", "peer2x", "perseus", "--window", "0", "-1", "nan",
           "--out", "--from-json", "-q", "--quiet", "s.json", "bad.onnx", "h1"]


@FUZZ
@given(st.sampled_from(ML_VERBS), tokens(ML_OPTS))
def test_model_and_ml_argv(hermetic: Path, group_verb: tuple[str, str], rest: list[str]) -> None:
    argv = [*group_verb, *rest]
    code, _, err = run_main(argv)
    check_outcome(argv, code, err)


@pytest.mark.parametrize("argv", [
    ["add", "-t", "null"],                                  # a device verb, no driver
    ["add", "-t", "null", "--foreground"],
    ["add", "-t", "loop", "-f", "disk.img"],
    ["del", "-n", "0"],
    ["del", "--all"],
    ["list", "-v"],
    ["features", "--json"],
])
def test_device_verbs_fail_cleanly_without_the_driver(hermetic: Path, argv: list[str]) -> None:
    code, out, err = run_main(argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "ublk driver is not loaded" in err
    assert "modprobe ublk_drv" in err  # says what to do


def test_usage_errors_are_one_line_not_the_usage_block(hermetic: Path) -> None:
    for argv in (["add", "-t", "bogus"], ["del"], ["add", "-q", "x", "-t", "null"],
                 ["agent", "add"], ["agent", "recommend", "--ext", "x"], ["model", "use"]):
        code, _, err = run_main(argv)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and "error:" in err, (argv, err)


def test_real_process_with_undecodable_bytes(tmp_path: Path) -> None:
    """A real argv with bytes that are not UTF-8 (surrogate-escaped in Python)."""
    env = {**os.environ, "UBLKML_STATE_DIR": str(tmp_path), "UBLKML_AGENT_DIR": str(tmp_path)}
    bad = os.fsencode("x\udcff\udcfe.img")
    for argv in ([b"add", b"-t", b"loop", b"-f", bad], [b"model", b"validate", bad],
                 [b"add", b"-t", bad], [b"agent", b"stats", bad]):
        proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"ublk_driver", *argv],
                              capture_output=True, timeout=60, env=env, cwd=tmp_path)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode in (1, 2), (argv, proc.returncode, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
