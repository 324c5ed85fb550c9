"""smartctl --json parsing: ATA and NVMe drives, and clear errors for bad output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml.features import SMART_FEATURES
from ml.smart import SmartError, assess, parse_smartctl_json, read_backblaze, read_smart
from ml.synth import SmartConfig, make_smart
from tests.ml.helpers import ml_main


def ata(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "json_format_version": [1, 0],
        "smartctl": {"version": [7, 3], "exit_status": 0},
        "device": {"name": "/dev/sda", "type": "sat", "protocol": "ATA"},
        "model_name": "ST4000DM000", "serial_number": "Z1",
        "smart_status": {"passed": True},
        "ata_smart_attributes": {"revision": 16, "table": [
            {"id": 5, "name": "Reallocated_Sector_Ct", "value": 100, "raw": {"value": 8}},
            {"id": 9, "name": "Power_On_Hours", "value": 90, "raw": {"value": 12000}},
            {"id": 194, "name": "Temperature_Celsius", "value": 36,
             "raw": {"value": 154618822692}},  # min/max packed in the high bytes
            {"id": 197, "name": "Current_Pending_Sector", "value": 100, "raw": {"value": 2}},
            {"id": 241, "name": "Total_LBAs_Written", "value": 100, "raw": {"value": 1}},
        ]},
    }
    doc.update(over)
    return doc


def test_ata() -> None:
    r = parse_smartctl_json(json.dumps(ata()))
    assert r.device == "/dev/sda" and r.serial == "Z1" and r.passed is True
    assert r.features["smart_5_raw"] == 8 and r.features["smart_197_raw"] == 2
    assert r.features["smart_194_raw"] == 36
    assert set(r.missing) == {"smart_187_raw", "smart_188_raw", "smart_198_raw"}
    v = r.vector(("smart_9_raw", "smart_5_raw"))
    assert v.dtype == np.float32 and list(v[0]) == [12000, 8]


def test_nvme() -> None:
    doc = {"smartctl": {"exit_status": 0}, "device": {"name": "/dev/nvme0"},
           "nvme_smart_health_information_log": {"temperature": 40, "power_on_hours": 7,
                                                 "media_errors": 3}}
    r = parse_smartctl_json(json.dumps(doc))
    assert r.features["smart_187_raw"] == 3 and r.features["smart_9_raw"] == 7
    assert "smart_5_raw" in r.missing


def test_failing_status_bit() -> None:
    doc = ata(smartctl={"exit_status": 8})
    assert parse_smartctl_json(json.dumps(doc)).passed is False


BAD = [
    ("not json", "Device open failed", "not JSON"),
    ("a list", "[1, 2]", "JSON object"),
    ("no smartctl", json.dumps({"device": {}}), "not smartctl --json output"),
    ("open failed", json.dumps({"smartctl": {"exit_status": 2, "messages": [
        {"string": "/dev/sdz: No such device", "severity": "error"}]}}),
     "could not be opened.*No such device"),
    ("bad command line", json.dumps({"smartctl": {"exit_status": 1}}), "did not parse"),
    ("no attributes", json.dumps({"smartctl": {"exit_status": 0}}), "no SMART attributes"),
    ("table not a list", json.dumps(ata(ata_smart_attributes={"table": {}})), "not a list"),
    ("raw missing", json.dumps(ata(ata_smart_attributes={"table": [{"id": 5}]})),
     "no raw value"),
    ("raw text", json.dumps(ata(ata_smart_attributes={"table": [
        {"id": 5, "raw": {"value": "eight"}}]})), "not a number"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_output(name: str, text: str, message: str) -> None:
    with pytest.raises(SmartError, match=message) as e:
        parse_smartctl_json(text, "/dev/sdz")
    assert str(e.value).startswith("/dev/sdz: ") and "\n" not in str(e.value)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                           st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.sampled_from(["smartctl", "exit_status", "table", "id", "raw",
                                                "value", "ata_smart_attributes", "device",
                                                "nvme_smart_health_information_log",
                                                "media_errors", "power_on_time", "x"]), c,
                               max_size=4), max_leaves=12)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_fails_only_with_smart_error(doc: Any) -> None:
    try:
        r = parse_smartctl_json(json.dumps(doc))
    except SmartError:
        pass
    else:
        assert set(r.features) == set(SMART_FEATURES)


def test_runner_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = read_smart("/dev/sda", runner=lambda cmd: (0, json.dumps(ata())))
    assert r.features["smart_5_raw"] == 8
    p = tmp_path / "s.json"
    p.write_text(json.dumps(ata()))
    assert ml_main(["smart", "--from-json", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["score"] <= 1 and "smart_187_raw" in out["missing"]
    p.write_text("garbage")
    assert ml_main(["smart", "--from-json", str(p)]) == 1
    assert "not JSON" in capsys.readouterr().err


def test_backblaze_round_trip(tmp_path: Path) -> None:
    fails = make_smart(str(tmp_path), 5, SmartConfig(drives=30, days=10, fail_fraction=0.3))
    h = read_backblaze(str(tmp_path))
    assert h.x.shape[1] == len(SMART_FEATURES)
    assert int(h.failure.sum()) == len(fails) > 0
    (tmp_path / "2024-01-01.csv").write_text("date,serial_number\n")
    with pytest.raises(SmartError, match=r"missing column.*failure"):
        read_backblaze(str(tmp_path))


# ---- the drive's own verdict, and the failure model beside it ----------------------------


def nvme(critical_warning: Any = 0, passed: bool | None = True, status: int = 0,
         media_errors: int = 0) -> dict[str, Any]:
    """The fields smartctl 7.3 gives for an NVMe drive (-a --json)."""
    doc: dict[str, Any] = {
        "smartctl": {"version": [7, 3], "exit_status": status},
        "device": {"name": "/dev/nvme0", "type": "nvme", "protocol": "NVMe"},
        "model_name": "QEMU NVMe Ctrl", "serial_number": "UBLKML-NVME0",
        "nvme_smart_health_information_log": {
            "critical_warning": critical_warning, "temperature": 50, "available_spare": 100,
            "power_on_hours": 5, "media_errors": media_errors}}
    if passed is not None:
        doc["smart_status"] = {"passed": passed, "nvme": {"value": critical_warning}}
    return doc


def test_nvme_critical_warning_is_the_drives_own_verdict() -> None:
    ok = parse_smartctl_json(json.dumps(nvme()))
    assert ok.critical_warning == 0 and not ok.critical and ok.warnings == ()
    # What smartctl says of a drive whose controller sets bit 2: FAILED, exit bit 3.
    bad = parse_smartctl_json(json.dumps(nvme(4, passed=False, status=8)))
    assert bad.critical and bad.critical_warning == 4 and bad.passed is False
    assert bad.warnings == ("NVMe critical warning: reliability degraded (media or internal "
                            "errors)",)
    # The byte alone is enough, whatever smart_status says.
    assert parse_smartctl_json(json.dumps(nvme(2, passed=None))).critical
    with pytest.raises(SmartError, match="not a byte"):
        parse_smartctl_json(json.dumps(nvme(256)))
    with pytest.raises(SmartError, match="critical_warning"):
        parse_smartctl_json(json.dumps(nvme("high")))


def test_ata_failed_is_critical() -> None:
    r = parse_smartctl_json(json.dumps(ata(smart_status={"passed": False})))
    assert r.critical and r.critical_warning is None
    assert r.warnings == ("SMART overall-health self-assessment: FAILED",)
    assert not parse_smartctl_json(json.dumps(ata())).critical


@given(st.integers(0, 255))
def test_every_critical_warning_byte(cw: int) -> None:
    r = parse_smartctl_json(json.dumps(nvme(cw, passed=cw == 0)))
    assert r.critical == (cw != 0)
    named = bin(cw & 0x3F).count("1")
    assert len(r.warnings) == named + (1 if cw & 0xC0 else 0)


def test_assess_with_the_packaged_failure_model() -> None:
    from ml.model import reference_model

    model = reference_model("failure")
    healthy = assess(parse_smartctl_json(json.dumps(ata())), model)
    assert healthy.risk is not None and healthy.risk < model.threshold
    assert not healthy.flagged and healthy.reason == "healthy"
    rows = ata()["ata_smart_attributes"]["table"] + [
        {"id": 187, "raw": {"value": 50}}, {"id": 198, "raw": {"value": 40}}]
    rows = [r if r["id"] not in (5, 197) else {**r, "raw": {"value": 300}} for r in rows]
    risky = assess(parse_smartctl_json(json.dumps(ata(ata_smart_attributes={"table": rows}))),
                   model)
    assert risky.flagged and not risky.critical and risky.risk is not None
    assert risky.risk >= model.threshold and "failure risk" in risky.reason
    critical = assess(parse_smartctl_json(json.dumps(nvme(8, passed=False, status=8))), model)
    assert critical.flagged and critical.critical and "read-only" in critical.reason
    # Without a model the drive's own word still counts.
    alone = assess(parse_smartctl_json(json.dumps(nvme(1, passed=False))))
    assert alone.risk is None and alone.flagged and "spare" in alone.reason


def test_real_smartctl_on_a_loop_device(tmp_path: Path) -> None:
    """A loop device has no SMART: the real smartctl says so, as one SmartError line."""
    if shutil.which("smartctl") is None:
        pytest.fail("smartctl is missing: install smartmontools (scripts/setup.sh does)")
    if os.geteuid() != 0:
        pytest.fail("this test needs root (a loop device)")
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        with pytest.raises(SmartError) as e:
            read_smart(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert "Unable to detect device type" in str(e.value) and "\n" not in str(e.value)
