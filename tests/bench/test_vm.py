"""End to end: ``ublkml bench --quick`` in the real test bed (or natively with ublk).

1-s measurements: a smoke test of the whole chain (every group, device and
report, the quick plan's three overhead rounds), which is what this test asserts;
the figures of a quick run are not quoted anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ublk_driver.testbed import in_vm

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.vm
@pytest.mark.skipif(in_vm(), reason="already inside the test bed (no nested qemu)")
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "ublk_driver", "bench", "--quick",
                           "--runtime", "1", "--ramp", "0.5", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    log = proc.stderr[-6000:]
    assert (out / "results.json").exists(), log
    doc = json.loads((out / "results.json").read_text())
    results = doc["results"]
    assert {r["group"] for r in results} == {"null", "loop", "python", "overhead"}, log
    assert {r["device"] for r in results} == {"null_blk", "ublkml-null", "kernel-loop",
                                              "ublkml-loop", "nbdkit-python",
                                              "ublkml-python", "ublkml-null-off",
                                              "ublkml-null-acct", "ublkml-null-score",
                                              "ublkml-null-monitor"}
    failed = [f"{r['device']} q{r['queues']}: {r.get('error')}" for r in results
              if r["status"] != "ok"]
    assert not failed, "\n".join(failed) + "\n" + log
    assert proc.returncode == 0, log
    for r in results:
        assert r["iops"] > 0 and r["lat_us"]["p50"] > 0
        assert r["fio_version"].startswith("fio-")
        assert r["kernel"].startswith("6.")
    acct = [r for r in results if r["device"] == "ublkml-null-acct"]
    assert len(acct) >= 3 and all(r["accounting"]["ios_counted"] > 0 for r in acct)
    mon = [r for r in results if r["device"] == "ublkml-null-monitor"]
    assert len(mon) >= 3 and all(r["monitor"]["source"] == "ebpf" for r in mon)
    cost = doc["meta"]["bpf_cost"]
    assert "error" not in cost, cost
    assert cost["ios"] > 0 and 0 < cost["ns_per_io"] < 1e6, cost
    assert doc["meta"]["loop_backing"]["filesystem"] == "ext4", doc["meta"]["loop_backing"]
    ublk_queues = {(r["device"], r["queues"]): r["device_attrs"]["hw_queues"]
                   for r in results}
    assert ublk_queues[("ublkml-null", 2)] == 2
    assert ublk_queues[("null_blk", 2)] == 2
    md = (out / "report.md").read_text()
    assert "## Targets" in md
    assert "ublkml null >= 0.70 x null_blk IOPS" in md
    assert "eBPF accounting on >= 0.97 x off IOPS" in md
    assert "ublkml null --score >= 0.95 x plain IOPS" in md
    # Every device was torn down: the guest is gone, but its console says so.
    assert "warning: could not" not in proc.stderr
