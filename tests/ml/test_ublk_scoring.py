"""The scorer on a real ublk device: fio's completions reach it and path 0 gets a verdict."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ublk_driver.targets import MemTarget
from ublk_driver.uapi import Op


@pytest.mark.ublk
@pytest.mark.parametrize("summaries", [False, True], ids=["records", "summaries"])
def test_scorer_scores_a_live_mem_device(tmp_path: Path, summaries: bool) -> None:
    """With ``summaries`` the scorer counts from the queue thread's per-path
    counts and the records only feed the hook: both must see every completion."""
    from ml.scorer import Scorer, verdicts_file
    from ublk_driver import Server, ServerConfig

    server = Server(MemTarget(16 << 20), ServerConfig(queues=1, depth=32,
                                                       record_capacity=1 << 14,
                                                       summaries=summaries))
    server.add()
    tapped: list[np.ndarray] = []
    verdicts: list[tuple[int, float, bool]] = []
    # A window long enough (1000 ticks) to hold the whole fio run, so that the
    # verdict's completion count can be checked against what was drained.
    scorer = Scorer(server, window_ticks=1000, dev_id=server.dev_id, directory=str(tmp_path),
                    on_records=lambda r: tapped.append(r.copy()),
                    on_verdict=lambda p, s, f: verdicts.append((p, s, f)))
    try:
        server.start()
        scorer.start()
        subprocess.run(["fio", "--name=r", f"--filename={server.bdev}", "--ioengine=io_uring",
                        "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                        "--number_ios=1000", "--size=16M", "--output-format=json"],
                       check=True, capture_output=True, timeout=300)
        scorer.stop()  # a last tick drains what is left
        dropped = server.records_dropped()
    finally:
        scorer.stop()
        assert server.shutdown() == []
    recs = np.concatenate(tapped)
    # Writes: the kernel's partition scan also reads 4k blocks, but never writes.
    fio_writes = recs[(recs["op"] == Op.WRITE) & (recs["length"] == 4096)]
    assert len(fio_writes) == 1000 and dropped == 0
    assert scorer.consumed == len(recs) and scorer.errors == 0
    v = scorer.verdicts()
    assert set(v) == {0}
    assert v[0].completions == len(recs)
    assert 0 <= v[0].score <= 1 and not v[0].flagged   # one healthy path: nothing to flag
    assert v[0].features["peer_lat_ratio"] == 1.0 and v[0].features["iops"] > 0
    assert verdicts and verdicts[-1][0] == 0
    state = json.loads(Path(verdicts_file(server.dev_id, str(tmp_path))).read_text())
    assert state["verdicts"][0]["completions"] == len(recs)
    print(f"scorer: {scorer.stats()}")
