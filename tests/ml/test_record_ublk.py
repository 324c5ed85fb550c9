"""``ublkml ml record`` on a real ublk mirror: the tree's layout, and a 10x-slow leg stands out.

Marked ``ublk``: natively where /dev/ublk-control exists, else in the test bed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml import detect
from ml.model import reference_model
from ml.telemetry import read_labels, read_tree, tree_window
from tests.ml.helpers import ml_main

pytestmark = pytest.mark.ublk


def test_record_a_short_run_with_a_slow_leg(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rec"
    assert ml_main(["record", str(out), "--hosts", "1", "--legs", "4", "--minutes", "0.75",
                    "--mix", "none", "--fault", "1:slow=10", "--seed", "3", "--leg-mib", "32",
                    "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["hosts"] == 1 and summary["drives"] == 4 and summary["slow_drives"] == 1
    assert summary["records_dropped"] == 0
    # The layout: one host directory of day files with exactly the Perseus columns.
    (host_dir,) = [p for p in out.iterdir() if p.is_dir()]
    assert host_dir.name == "r3h000"
    for f in host_dir.glob("*.csv"):
        assert f.read_text().splitlines()[0] == "ts,disk_id,throughput,latency"
    assert read_labels(str(out / "labels.csv")) == {("r3h000", "leg1")}
    assert tree_window(str(out)) == 30.0
    state = json.loads((out / "recording.json").read_text())
    assert [lp["kind"] for lp in state["hosts"][0]["legs"]] == [
        "healthy", "given", "healthy", "healthy"]
    (h,) = read_tree(str(out))
    assert h.disk_ids == ("leg0", "leg1", "leg2", "leg3")
    for d in range(4):
        ts = h.ts[h.drive == d]
        # 45 one-second rows (a leg may have an empty second under a loaded test bed)
        assert 40 <= ts.size <= 45 and np.all(np.diff(ts) >= 1)
        assert np.all(h.throughput[h.drive == d] > 0)
    med = np.array([np.median(h.latency[h.drive == d]) for d in range(4)])
    print(f"median latency per leg (us): {med.round(1).tolist()}")
    # The slow leg stands out: several times its peers, and every detector says so.
    assert med[1] >= 4 * np.median(med[[0, 2, 3]])
    for method in detect.METHODS:
        model = reference_model("fail_slow") if method == "model" else None
        flagged = {v.disk_id for v in detect.run(method, [h], model, 30.0) if v.flagged}
        assert flagged == {"leg1"}, method
