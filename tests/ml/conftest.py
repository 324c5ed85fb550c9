"""Shared fixtures of the ml tests: the committed recording of real ublk mirrors.

``tests/ml/data/recorded-heldout`` is a held-out set recorded in the qemu test
bed with ``ublkml ml record`` (real ublk_drv, real mirror legs on ext4 over
brd, seeded fault injection): the command, the fault mix and the figures are in
docs/models.md, "Recorded telemetry".  It was never used to train or tune a
model.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

RECORDED_HELDOUT = Path(__file__).parent / "data" / "recorded-heldout"


@pytest.fixture(scope="session")
def recorded_heldout() -> Path:
    """The committed held-out recording (its absence is a failure, not a skip)."""
    assert (RECORDED_HELDOUT / "recording.json").is_file(), f"{RECORDED_HELDOUT} is missing"
    return RECORDED_HELDOUT


@pytest.fixture(scope="session")
def recorded_split(recorded_heldout: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The committed recording cut in two by host (first half, second half),
    each a complete tree (host directories, labels.csv, recording.json): for
    tests of the training and comparison code, not for figures."""
    state = json.loads((recorded_heldout / "recording.json").read_text())
    hosts = [h["host"] for h in state["hosts"]]
    with open(recorded_heldout / "labels.csv", newline="") as f:
        labels = [(r["host"], r["disk_id"]) for r in csv.DictReader(f)]
    half = len(hosts) // 2
    out = []
    for name, part in (("a", hosts[:half]), ("b", hosts[half:])):
        d = tmp_path_factory.mktemp(f"recorded-{name}")
        for h in part:
            shutil.copytree(recorded_heldout / h, d / h)
        (d / "labels.csv").write_text("host,disk_id\n" + "".join(
            f"{h},{disk}\n" for h, disk in labels if h in part))
        (d / "recording.json").write_text(json.dumps(
            {**state, "hosts": [h for h in state["hosts"] if h["host"] in part]}))
        out.append(d)
    return out[0], out[1]
