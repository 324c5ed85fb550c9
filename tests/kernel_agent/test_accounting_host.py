"""eBPF accounting on the host against a loop device: the counts are exact.

Needs root and eBPF (the ``bpf_ok`` fixture fails, not skips, without them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_agent.accounting import (
    CFG,
    EVENT,
    STATS,
    BpfAccounting,
    PinnedAccounting,
    resolve_device,
    sysfs_stats,
)
from kernel_agent.agent import Agent
from kernel_agent.errors import AgentError
from kernel_agent.registry import Registry

from .conftest import fio, fio_totals


def test_layouts_match_the_object() -> None:
    """The Python mirrors have the sizes of the C structures (from the object's BTF)."""
    from kernel_agent.accounting import OBJECT_PATH

    out = subprocess.run(["bpftool", "btf", "dump", "file", str(OBJECT_PATH)],
                         capture_output=True, text=True, check=True).stdout
    assert f"STRUCT 'ka_dev_stats' size={STATS.size}" in out
    assert f"STRUCT 'ka_dev_cfg' size={CFG.size}" in out
    assert EVENT.size == 48


@pytest.mark.parametrize("attach, precise", [("tp_btf", False), ("tp_btf", True),
                                             ("tracepoint", None)])
def test_exact_counts(bpf_ok: None, loopdev: str, instance: str, attach: str,
                      precise: bool | None) -> None:
    bd = resolve_device(loopdev)
    with BpfAccounting(instance, attach=attach) as acc:
        acc.watch(bd, precise=precise)
        reads = fio(f"/dev/{loopdev}", "--ioengine=psync", "--rw=randread", "--bs=4k",
                    "--number_ios=1000", "--size=32M", "--randseed=1")
        writes = fio(f"/dev/{loopdev}", "--ioengine=io_uring", "--iodepth=16",
                     "--rw=randwrite", "--bs=16k", "--number_ios=600", "--size=32M")
        got = acc.stats(bd)
        missed = acc.missed_runs()
    want = {k: fio_totals(reads)[k] + fio_totals(writes)[k] for k in fio_totals(reads)}
    assert want == {"read_ios": 1000, "read_bytes": 4096000, "write_ios": 600,
                    "write_bytes": 600 * 16384}
    if attach == "tracepoint" and missed:
        # Classic tracepoints: the kernel skipped (and counted) program runs
        # that interrupted another one on the same CPU; the shortfall is
        # bounded by what it reports, and never an over-count.
        short = 1600 - got.total_ios
        assert 0 <= short <= missed, (got.ios, missed)
        return
    assert missed == 0
    assert got.ios == {"read": 1000, "write": 600, "flush": 0, "discard": 0, "other": 0}
    assert got.bytes["read"] == 4096000 and got.bytes["write"] == 600 * 16384
    assert got.in_flight == 0 and got.errors == 0 and got.source == "ebpf"
    assert sum((got.latency_hist_us or {}).values()) == 1600


def test_completion_only_counts_exactly_without_in_flight(bpf_ok: None, loopdev: str,
                                                          instance: str) -> None:
    """The completion program alone (the monitor's accounting) counts the same
    I/Os, bytes and latencies, attaches no issue program, and says in-flight
    is not counted rather than reporting a negative number."""
    bd = resolve_device(loopdev)
    with BpfAccounting(instance, in_flight=False) as acc:
        assert acc.attach == "tp_btf" and acc.completion_only()
        assert [name for name, _ in acc._attached] == ["ka_btf_complete"]
        acc.watch(bd)
        fio(f"/dev/{loopdev}", "--ioengine=io_uring", "--iodepth=8", "--rw=randrw",
            "--bs=8k", "--number_ios=900", "--size=32M", "--randseed=2")
        got = acc.stats(bd)
        doc = got.to_json()
    assert got.total_ios == 900 and got.ios["read"] + got.ios["write"] == 900
    assert got.bytes["read"] + got.bytes["write"] == 900 * 8192
    assert sum((got.latency_hist_us or {}).values()) == 900
    assert got.latency_sum_ns and got.latency_sum_ns > 0
    assert got.in_flight is None and doc["in_flight"] is None


def test_completion_only_refuses_a_queue_without_stamps(bpf_ok: None, loopdev: str,
                                                        instance: str) -> None:
    """iostats off: requests carry no start stamp, so completions alone cannot
    time them; watching says so in one line instead of counting nothing."""
    bd = resolve_device(loopdev)
    iostats = Path(f"/sys/block/{loopdev}/queue/iostats")
    iostats.write_text("0")
    try:
        with BpfAccounting(instance, in_flight=False) as acc, \
                pytest.raises(AgentError, match="iostats"):
            acc.watch(bd)
    finally:
        iostats.write_text("1")


def test_slow_events_logged_and_pinned_view(bpf_ok: None, loopdev: str, instance: str,
                                            agent_dir: Path) -> None:
    """The agent logs every I/O over the threshold; another process reads the pins."""
    Registry(agent_dir).watch(loopdev, "observe", slow_us=1)  # every I/O is "slow"
    agent = Agent(agent_dir, instance=instance)
    try:
        agent.sync(force=True)
        fio(f"/dev/{loopdev}", "--ioengine=psync", "--rw=randread", "--bs=4k",
            "--number_ios=200", "--size=32M")
        for _ in range(5):
            agent.step(0.05)
        stats = agent.stats(loopdev)
        assert stats.slow_ios == 200 and stats.events_dropped == 0
        proc = subprocess.run([sys.executable, "-m", "kernel_agent", "stats", loopdev,
                               "--json"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["source"] == "ebpf" and doc["attach"] == "tp_btf"
        assert doc["ops"]["read"] == {"ios": 200, "bytes": 819200}
        pinned = PinnedAccounting(instance)
        assert pinned.stats(resolve_device(loopdev)).ios["read"] == 200
        pinned.close()
    finally:
        agent.close()
    events = [json.loads(line) for line in (agent_dir / "events.jsonl").read_text()
              .splitlines()]
    assert len(events) == 200
    assert all(e["event"] == "slow" and e["device"] == loopdev and e["bytes"] == 4096
               for e in events)
    assert not Path(f"/sys/fs/bpf/ublkml/{instance}").exists()  # unpinned on close


def test_sysfs_fallback_says_so(loopdev: str, agent_dir: Path) -> None:
    Registry(agent_dir).watch(loopdev)
    agent = Agent(agent_dir, use_bpf=False)
    try:
        agent.sync(force=True)
        before = agent.stats(loopdev)
        fio(f"/dev/{loopdev}", "--ioengine=psync", "--rw=randread", "--bs=4k",
            "--number_ios=100", "--size=32M")
        after = agent.stats(loopdev)
        assert after.source == "sysfs" and "eBPF" in after.note
        assert after.ios["read"] - before.ios["read"] == 100
        # With no agent running, the CLI falls back too, and says why.
        proc = subprocess.run([sys.executable, "-m", "kernel_agent", "stats", loopdev,
                               "--json"], capture_output=True, text=True, timeout=60)
        doc = json.loads(proc.stdout)
        assert doc["source"] == "sysfs"
    finally:
        agent.close()
    assert sysfs_stats(resolve_device(loopdev)).source == "sysfs"
