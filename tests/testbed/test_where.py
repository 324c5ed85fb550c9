"""ublk_driver.testbed.where: run here or re-run in the test bed, one result convention."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest

from ublk_driver.core.errors import DriverUnavailableError
from ublk_driver.testbed import TestbedError, TestbedTimeout, VmResult, where


def _place(monkeypatch: pytest.MonkeyPatch, *, native: bool, guest: bool) -> None:
    monkeypatch.setattr(where, "native_ublk_available", lambda: native)
    monkeypatch.setattr(where, "in_vm", lambda: guest)


def test_needs_testbed_only_without_ublk_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _place(monkeypatch, native=True, guest=False)
    assert where.needs_testbed() is False
    _place(monkeypatch, native=False, guest=False)
    assert where.needs_testbed() is True
    assert where.needs_testbed(in_vm_flag=True) is False  # the re-run itself runs here
    _place(monkeypatch, native=False, guest=True)
    with pytest.raises(DriverUnavailableError, match=r"inside the test bed but "
                       r"/dev/ublk-control is missing \(modprobe ublk_drv\)"):
        where.needs_testbed()


def _fake_run(monkeypatch: pytest.MonkeyPatch, result: VmResult | Exception
              ) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def run(argv: list[str], **kw: Any) -> VmResult:
        calls.append({"argv": argv, **kw})
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(where, "run", run)
    return calls


def test_re_runs_the_same_command_with_in_vm(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_run(monkeypatch, VmResult(0, "fine\n", 5.0, 60.0, str(tmp_path), "dmesg"))
    said: list[str] = []
    res = where.run_in_testbed(["demo", "failslow"], ["--out", str(tmp_path), "--quick"],
                               share=tmp_path, doing="running", estimate_s=600,
                               timeout=1200, memory_mb=2048, cpus=1, say=said.append)
    assert calls[0]["argv"] == [sys.executable, "-m", "ublk_driver", "demo", "failslow",
                                "--in-vm", "--out", str(tmp_path), "--quick"]
    assert (calls[0]["share"], calls[0]["timeout"]) == (str(tmp_path), 1200)
    assert (calls[0]["memory_mb"], calls[0]["cpus"], calls[0]["stream"]) == (2048, 1, False)
    assert said == ["no /dev/ublk-control here: running in the qemu test bed (one boot, "
                    "about 10 min; timeout 20 min)"]
    assert (res.code, res.error, res.failure()) == (0, None, None)
    assert (res.boot_seconds, res.total_seconds, res.kernel_log) == (5.0, 60.0, "dmesg")
    assert res.console_log == tmp_path / "vm-console.log"  # kept: keep_console
    assert res.check() is res


def test_guest_failure_keeps_the_console_and_its_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_run(monkeypatch, VmResult(3, "step 1\nrecord: error: no space\nbye\n", 1, 2))
    stream = io.StringIO()
    res = where.run_in_testbed(["ml", "record"], [str(tmp_path)], share=tmp_path,
                               doing="recording", estimate_s=60, timeout=600,
                               stream=stream, keep_console=False, say=lambda m: None)
    assert res.code == 3 and res.error is None
    assert (tmp_path / "vm-console.log").read_text().startswith("step 1")
    assert res.failure() == ("the command failed in the test bed (exit status 3): record: "
                             f"error: no space; console in {tmp_path / 'vm-console.log'}")
    with pytest.raises(where.TestbedRunError) as err:
        res.check()
    assert err.value.code == 3


def test_success_without_keep_console_saves_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_run(monkeypatch, VmResult(0, "ok\n", 1, 2))
    res = where.run_in_testbed(["demo", "loop"], share=None, doing="running", estimate_s=60,
                               timeout=600, keep_console=False, say=lambda m: None)
    assert res.console_log is None and res.output == "ok\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [
    TestbedError("qemu-system-x86_64 not found", output=""),
    TestbedTimeout("the guest command did not finish within 9 s; qemu was killed",
                   output="half", timeout=9),
])
def test_testbed_failure_is_125(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                error: TestbedError) -> None:
    _fake_run(monkeypatch, error)
    log = tmp_path / "logs" / "vm-console.log"
    res = where.run_in_testbed(["bench"], share=tmp_path, doing="measuring", estimate_s=60,
                               timeout=9, console_log=log, say=lambda m: None)
    assert res.code == where.TESTBED_FAILED == 125
    assert res.failure() == f"the test bed failed: {error}"
    assert (res.console_log == log) == bool(error.output)
    if error.output:
        assert log.read_text() == "half"
    with pytest.raises(where.TestbedRunError) as err:
        res.check()
    assert err.value.code == 125 and str(err.value).startswith("the test bed failed: ")
