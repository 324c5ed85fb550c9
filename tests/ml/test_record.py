"""The recorder's host-side parts: seeded plans, record folding, the tree it writes.

The recording itself needs ublk: ``test_record_ublk.py`` (marked ``ublk``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ml import record
from ml.record import (
    MIXES,
    Aggregator,
    RecordConfig,
    RecordError,
    disk_id,
    parse_fault_arg,
    plan_host,
    write_host,
)
from ml.telemetry import read_labels, read_tree, tree_window
from tests.ml.helpers import ml_main
from ublk_driver.faults import FaultSpec
from ublk_driver.records import COMPLETION_DTYPE


def test_plans_are_seeded_and_bounded() -> None:
    a = RecordConfig(seed=5, hosts=30, legs=4).plans()
    b = RecordConfig(seed=5, hosts=40, legs=4).plans()
    assert a == b[:30]                              # more hosts: the first ones are unchanged
    assert a != RecordConfig(seed=6, hosts=30, legs=4).plans()
    kinds = {lp.kind for p in a for lp in p.legs}
    assert {"healthy", "const", "burst", "ramp"} <= kinds
    for p in a:
        slow = [lp for lp in p.legs if lp.slow]
        assert len(slow) <= 2                       # at most legs // 2: peers stay healthy
        for lp in p.legs:
            assert lp.slow == (lp.kind in record.SLOW_KINDS)
            if lp.fault:
                spec = FaultSpec.parse(lp.fault)
                assert 0 <= lp.onset_s < p.seconds
                if lp.kind in ("const", "burst", "ramp"):
                    assert 2.0 <= spec.slow <= 20.0
                if lp.kind == "hiccup":            # short and rare: healthy
                    assert spec.burst_on_ms / spec.burst_period_ms <= 0.03
            else:
                assert lp.kind == "healthy" and not lp.slow
    held = RecordConfig(seed=5, hosts=30, legs=4, mix="heldout").plans()
    delays = [FaultSpec.parse(lp.fault).delay_us for p in held for lp in p.legs
              if lp.kind == "delay"]
    assert delays and all(1000 <= d <= 10000 for d in delays)   # healthy legs: ~0.5-1 ms


def test_given_faults_override_the_mix() -> None:
    p = plan_host(1, 0, 4, 60, MIXES["train"], {1: FaultSpec(slow=10)})
    assert [(lp.kind, lp.slow) for lp in p.legs] == [
        ("healthy", False), ("given", True), ("healthy", False), ("healthy", False)]
    assert p.legs[1].fault == "slow=10" and p.legs[1].onset_s == 0
    assert parse_fault_arg("1:slow=10,burst=2s/1s") == (1, "slow=10,burst=2s/1s")
    for bad in ("slow=10", "x:slow=10", "1:slow=0.5"):
        with pytest.raises(ValueError):
            parse_fault_arg(bad)


def _records(rows: list[tuple[float, int, int, int, int, int]]) -> np.ndarray:
    """(t_s, path, op, length, lat_us, result)"""
    r = np.zeros(len(rows), dtype=COMPLETION_DTYPE)
    for i, (t, path, op, length, lat, res) in enumerate(rows):
        r[i]["t_ns"] = int(t * 1e9)
        r[i]["path"], r[i]["op"], r[i]["length"] = path, op, length
        r[i]["lat_ns"], r[i]["result"] = lat * 1000, res
    return r


def test_aggregator_folds_per_leg_and_second() -> None:
    agg = Aggregator(legs=2, seconds=3, t0_ns=10 * 10**9)
    agg.add(_records([
        (9.9, 0, 0, 4096, 50, 4096),      # before t0
        (10.0, 0, 0, 4096, 100, 4096),
        (10.5, 0, 1, 8192, 300, 8192),    # a write counts
        (10.7, 1, 0, 4096, 1000, 4096),
        (11.2, 1, 0, 4096, 500, -5),      # failed: counted, not in the means
        (11.3, 1, 2, 0, 900, 0),          # flush: outside
        (12.99, 1, 0, 4096, 20, 4096),
        (13.0, 0, 0, 4096, 20, 4096),     # after the period
    ]))
    agg.add(_records([]))
    rows = agg.rows(1_700_000_000)
    assert rows == [(1_700_000_000, 0, 12288.0, 200.0), (1_700_000_000, 1, 4096.0, 1000.0),
                    (1_700_000_002, 1, 4096.0, 20.0)]
    s = agg.summary()
    assert s["records"] == 8 and s["outside_period"] == 3
    assert s["completions_per_leg"] == [2, 2] and s["failed_per_leg"] == [0, 1]
    assert s["empty_leg_seconds"] == 3


def test_written_tree_reads_back(tmp_path: Path) -> None:
    # Two days: a run across midnight UTC gives two files, read back as one host.
    midnight = 1_700_006_400
    assert midnight % 86400 == 0
    rows = [(midnight - 1, 0, 1000.0, 50.0), (midnight - 1, 1, 1000.0, 70.0),
            (midnight, 0, 2000.0, 55.0), (midnight, 1, 2000.0, 700.0)]
    files = write_host(tmp_path, "r1h000", rows)
    assert files == ["2023-11-14.csv", "2023-11-15.csv"]
    (h,) = read_tree(str(tmp_path))
    assert h.disk_ids == ("leg0", "leg1") and h.latency.tolist() == [50.0, 70.0, 55.0, 700.0]
    state = record._load_state(tmp_path / "new", RecordConfig(), resume=False)
    state["hosts"].append({"host": "r1h000", "rows": 4, "legs": [
        {"leg": 0, "kind": "healthy", "fault": "", "onset_s": 0.0, "slow": False},
        {"leg": 1, "kind": "const", "fault": "slow=10", "onset_s": 1.5, "slow": True}]})
    record._save_state(tmp_path, state)
    assert read_labels(str(tmp_path / "labels.csv")) == {("r1h000", "leg1")}
    assert (tmp_path / "injected.csv").read_text().splitlines()[2] == \
        "r1h000,leg1,const,slow=10,1.5,1"
    assert tree_window(str(tmp_path)) == record.WINDOW_S
    assert record.summary(tmp_path, state)["slow_drives"] == 1


def test_resume_needs_the_same_plan(tmp_path: Path) -> None:
    cfg = RecordConfig(seed=3)
    state = record._load_state(tmp_path, cfg, resume=False)
    record._save_state(tmp_path, state)
    with pytest.raises(RecordError, match="--resume to continue"):
        record._load_state(tmp_path, cfg, resume=False)
    assert record._load_state(tmp_path, RecordConfig(seed=3, hosts=9), resume=True)
    with pytest.raises(RecordError, match="same settings"):
        record._load_state(tmp_path, RecordConfig(seed=4), resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "recording.json").unlink()
    with pytest.raises(RecordError, match=r"no recording\.json"):
        record._load_state(tmp_path, cfg, resume=False)


def test_tree_window_errors(tmp_path: Path) -> None:
    assert tree_window(str(tmp_path)) is None
    (tmp_path / "recording.json").write_text(json.dumps({"window_s": -1}))
    with pytest.raises(ValueError, match="window_s must be a positive number"):
        tree_window(str(tmp_path))
    (tmp_path / "recording.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read it"):
        tree_window(str(tmp_path))


@pytest.mark.parametrize(("argv", "message"), [
    (["--legs", "1"], "--legs must be 2..8"),
    (["--legs", "9"], "--legs must be 2..8"),
    (["--minutes", "0.1"], "--minutes must give 10 s"),
    (["--minutes", "nan"], "--minutes must give 10 s"),
    (["--fault", "4:slow=10"], "names leg 4"),
    (["--fault", "1:slow=10", "--fault", "1:slow=3"], "names a leg twice"),
    (["--fault", "1:bogus=1"], "unknown fault setting"),
    (["--hosts", "0"], "--hosts must be"),
])
def test_cli_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   argv: list[str], message: str) -> None:
    assert ml_main(["record", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_fio_job_rates() -> None:
    w = record.Workload(read_mix=70, iops=1000, depth=8, block="4k-64k", bursty=True,
                        randseed=7)
    job = record.fio_job("/dev/ublkb3", w, 63)
    assert "rate_iops=700,300\n" in job and "bsrange=4k-64k" in job and "[bursts]" in job
    assert "randseed=7\n" in job and "runtime=63\n" in job


def test_the_committed_recording_is_its_seeded_plan(recorded_heldout: Path) -> None:
    """tests/ml/data/recorded-heldout (conftest.py): its faults and labels are
    what the seed gives, it was recorded in the test bed without losing a
    record, and every leg has (nearly) all its one-second rows."""
    state = json.loads((recorded_heldout / "recording.json").read_text())
    ident = state["config"]["identity"]
    cfg = RecordConfig(seed=ident["seed"], mix=ident["mix"], legs=ident["legs"],
                       minutes=ident["minutes"], hosts=len(state["hosts"]),
                       leg_mib=ident["leg_mib"])
    assert cfg.identity() == ident and ident["mix"] == "heldout" and not ident["faults"]
    plans = cfg.plans()
    keys = ("host", "index", "seconds", "workload", "legs")
    assert [p.to_dict() for p in plans] == [{k: h[k] for k in keys} for h in state["hosts"]]
    assert read_labels(str(recorded_heldout / "labels.csv")) == {
        (p.host, disk_id(lp.leg)) for p in plans for lp in p.legs if lp.slow}
    assert (recorded_heldout / "injected.csv").read_text() == record._injected_csv(
        state["hosts"])
    assert state["environment"]["in_vm"] and state["environment"]["filesystem"] == "ext4"
    assert state["window_s"] == tree_window(str(recorded_heldout)) == 30.0
    for h in state["hosts"]:
        assert h["records_dropped"] == 0 and not any(h["failed_per_leg"])
        # every fault went in within 0.5 s of its planned onset
        onsets = {str(lp["leg"]): lp["onset_s"] for lp in h["legs"] if lp["fault"]}
        assert set(h["fault_set_at_s"]) == set(onsets)
        for leg, at in h["fault_set_at_s"].items():
            assert 0 <= at - onsets[leg] < 0.5
    hosts = read_tree(str(recorded_heldout))
    assert [h.host for h in hosts] == [p.host for p in plans]
    for h in hosts:
        assert h.disk_ids == tuple(disk_id(i) for i in range(cfg.legs))
        counts = np.bincount(h.drive, minlength=cfg.legs)
        assert counts.min() >= 0.95 * cfg.seconds and counts.max() <= cfg.seconds
    size = sum(f.stat().st_size for f in recorded_heldout.rglob("*") if f.is_file())
    assert size < 512 << 10
