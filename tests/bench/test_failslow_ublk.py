"""The closed loop end to end on a real ublk device (in the test bed on hosts without ublk).

A short run of the demonstration: kernel agent, two-leg mirror with the scorer
and leg policy in its server, fio reads plus crc32c-verified writes; leg 1 made
10x slower through `ublkml fault set` -> demoted through the agent within 3 s
-> fault cleared -> re-admitted; fio verify passes (the runner raises if it
does not) and the legs are identical after.  Then a one-minute healthy run
with bursty mixed load: no demotion.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.failslow import QUICK, Plan, run_failslow

pytestmark = pytest.mark.ublk


def test_slow_leg_demoted_through_the_agent_and_readmitted(tmp_path: Path) -> None:
    doc = run_failslow(tmp_path, QUICK)
    run = doc["run"]
    print({k: run[k] for k in ("detect_s", "demote_s", "readmit_after_clear_s")},
          {k: v["p99_us"] for k, v in run["phases"].items()}, doc["reference"]["reads"])
    answers = [e for e in doc["events"] if e["event"] == "answer"]
    assert any(e["action"] == "demote_leg" and e["status"] == "applied" for e in answers)
    assert run["demote_s"] is not None and run["demote_s"] <= 3.0, doc["events"]
    assert run["readmitted"] is not None, doc["events"]
    assert [leg["state"] for leg in run["legs_after"]["legs"]] == ["active", "active"]
    assert all(j["error"] == 0 for j in run["fio"].values())
    assert doc["meta"]["legs_identical"]


def test_no_demotion_in_a_healthy_minute(tmp_path: Path) -> None:
    doc = run_failslow(tmp_path, Plan(healthy_minutes=1.0))
    assert doc["healthy"]["demotions"] == 0, doc["events"]
    assert all(j["error"] == 0 for j in doc["healthy"]["fio"].values())
    assert doc["meta"]["legs_identical"]
