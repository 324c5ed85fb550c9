"""Completion records: layout, content and the never-block rule (harness queue).

The harness stands in for the kernel driver only; the C ring, the targets
and the numpy view are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from ublk_driver import _bindings
from ublk_driver.queue import default_ring_flags
from ublk_driver.records import COMPLETION_DTYPE
from ublk_driver.targets import MemTarget
from ublk_driver.uapi import Op


def test_dtype_mirrors_the_c_struct() -> None:
    assert COMPLETION_DTYPE.itemsize == _bindings.sizeof("struct ublkml_completion")
    for name in COMPLETION_DTYPE.names or ():
        assert COMPLETION_DTYPE.fields is not None
        assert COMPLETION_DTYPE.fields[name][1] == _bindings.offsetof(
            "struct ublkml_completion", name), name


@pytest.fixture
def queue() -> Iterator[_bindings.Queue]:
    ct = MemTarget(1 << 20).attach()
    q = _bindings.Queue(ct, -1, 3, 4, 65536, True, default_ring_flags())
    yield q
    q.free()
    ct.free()


def test_every_completion_is_recorded(queue: _bindings.Queue) -> None:
    queue.enable_records(8)
    batch = _bindings.EventBatch(4)
    ops = [(Op.WRITE, 8, 8), (Op.READ, 8, 8), (Op.FLUSH, 0, 0), (Op.READ, 4096, 8)]
    for op, sector, n in ops:
        queue.inject(1, op, sector, n)
        queue.harvest(batch)
    out = np.zeros(16, dtype=COMPLETION_DTYPE)
    n = queue.read_records(out)
    assert n == 4
    recs = out[:n]
    assert list(recs["op"]) == [Op.WRITE, Op.READ, Op.FLUSH, Op.READ]
    assert list(recs["offset"]) == [4096, 4096, 0, 4096 * 512]
    assert list(recs["length"]) == [4096, 4096, 0, 4096]
    assert list(recs["result"]) == [4096, 4096, 0, -5]  # the last one is past the end
    assert set(recs["q_id"]) == {3} and set(recs["tag"]) == {1}
    assert np.all(np.diff(recs["t_ns"].astype(np.int64)) >= 0)
    assert queue.read_records(out) == 0  # drained


def test_full_ring_drops_and_counts(queue: _bindings.Queue) -> None:
    queue.enable_records(4)
    batch = _bindings.EventBatch(4)
    for _ in range(10):
        queue.inject(0, Op.READ, 0, 8)
        queue.harvest(batch)
    assert queue.records_dropped() == 6
    out = np.zeros(8, dtype=COMPLETION_DTYPE)
    assert queue.read_records(out) == 4
    queue.inject(0, Op.READ, 0, 8)
    queue.harvest(batch)
    assert queue.read_records(out) == 1


def test_capacity_must_be_a_power_of_two(queue: _bindings.Queue) -> None:
    with pytest.raises(OSError):
        queue.enable_records(6)


@pytest.mark.ublk
def test_records_from_a_real_device_match_fio() -> None:
    """Every request fio issues shows up once, with its real size and a latency."""
    import subprocess

    from ublk_driver import Server, ServerConfig

    server = Server(MemTarget(16 << 20), ServerConfig(queues=1, depth=32,
                                                       record_capacity=1 << 14))
    server.add()
    try:
        server.start()
        subprocess.run(["fio", "--name=r", f"--filename={server.bdev}", "--ioengine=io_uring",
                        "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                        "--number_ios=1000", "--size=16M", "--output-format=json"],
                       check=True, capture_output=True, timeout=300)
        recs = server.read_completions()
    finally:
        assert server.shutdown() == []
    # Writes: only fio issues them (the kernel's partition scan reads a few blocks).
    writes = recs[recs["op"] == Op.WRITE]
    assert len(writes) == 1000
    assert np.all(writes["length"] == 4096) and np.all(writes["result"] == 4096)
    assert np.all(writes["lat_ns"] > 0)

