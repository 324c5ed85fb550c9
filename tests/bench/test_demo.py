"""``ublkml demo [failslow|loop]``: which demonstration runs, and its test-bed round trip.

The test bed is a stand-in here; test_failslow_ublk.py and test_vm.py run the real thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench.test_failslow import _doc
from ublk_driver.core.cli import main as ublkml
from ublk_driver.testbed import VmResult, where


def _no_ublk(monkeypatch: pytest.MonkeyPatch, guest: Any) -> list[list[str]]:
    boots: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> VmResult:
        boots.append(argv)
        return guest(argv, kw)

    monkeypatch.setattr(where, "native_ublk_available", lambda: False)
    monkeypatch.setattr(where, "in_vm", lambda: False)
    monkeypatch.setattr(where, "run", run)
    return boots


def test_bare_demo_is_failslow_in_one_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def guest(argv: list[str], kw: dict[str, Any]) -> VmResult:
        (Path(kw["share"]) / "results.json").write_text(json.dumps(_doc()))
        return VmResult(0, "guest ran", 5.0, 60.0)

    boots = _no_ublk(monkeypatch, guest)
    out = tmp_path / "fs"
    assert ublkml(["demo", "--quick", "--out", str(out), "--no-report"]) == 0
    assert boots[0][1:6] == ["-m", "ublk_driver", "demo", "failslow", "--in-vm"]
    assert boots[0][-1] == "--quick" and str(out) in boots[0]
    assert (out / "vm-console.log").read_text() == "guest ran"
    err = capsys.readouterr().err
    assert "running in the qemu test bed" in err and "detect_and_demote_within_3s" in err


def test_failslow_reports_a_failed_test_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def guest(argv: list[str], kw: dict[str, Any]) -> VmResult:
        raise where.TestbedError("qemu-system-x86_64 not found")

    _no_ublk(monkeypatch, guest)
    assert ublkml(["demo", "failslow", "--out", str(tmp_path)]) == 125
    assert "the test bed failed: qemu-system-x86_64 not found" in capsys.readouterr().err


def test_loop_demo_re_runs_in_the_test_bed(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    codes = iter([0, 4])

    def guest(argv: list[str], kw: dict[str, Any]) -> VmResult:
        assert kw["share"] is None
        return VmResult(next(codes), "ublkml demo: error: e2fsck failed\n", 5.0, 60.0)

    boots = _no_ublk(monkeypatch, guest)
    assert ublkml(["demo", "loop", "-q", "1", "--json"]) == 0
    assert boots[0][3:] == ["demo", "loop", "--in-vm", "--size", "256M", "-q", "1", "-d", "64",
                            "--files", "24", "--json"]
    assert ublkml(["demo", "loop"]) == 4
    err = capsys.readouterr().err
    assert "ublkml: error: the command failed in the test bed (exit status 4): " \
           "ublkml demo: error: e2fsck failed" in err
