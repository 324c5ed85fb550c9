"""The agent end to end on the host: recommendations on a loop device, deaths.

Real components throughout: eBPF accounting, the ring file, /sys/block knobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel_agent.agent import Agent
from kernel_agent.eventlog import read_jsonl
from kernel_agent.registry import Registry
from kernel_agent.ring import Channel, Completion, Recommendation, Status
from kernel_agent.validator import Policy

from .conftest import fio


def pump(agent: Agent, ch: Channel, n: int, timeout: float = 15) -> list[Completion]:
    """Run the agent until ``n`` completions arrived on ``ch``."""
    got: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        agent.step(0.02)
        got += ch.completions()
    assert len(got) >= n, f"only {len(got)} of {n} completions: {got}"
    return got


@pytest.fixture
def setup(bpf_ok: None, loopdev: str, agent_dir: Path, instance: str) -> Iterator[
        Callable[..., tuple[Agent, Channel, int]]]:
    agents: list[Agent] = []
    procs: list[subprocess.Popen[bytes]] = []
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    ra_before = ra.read_text()

    def make(mode: str = "enforce", **kw: object) -> tuple[Agent, Channel, int]:
        reg = Registry(agent_dir)
        reg.watch(loopdev, mode)
        ext_proc = subprocess.Popen(["sleep", "600"])
        procs.append(ext_proc)
        ext = reg.add("ml-extension", {"pid": str(ext_proc.pid), "model": "test"})
        agent = Agent(agent_dir, instance=instance, **kw)  # type: ignore[arg-type]
        agents.append(agent)
        agent.sync(force=True)
        return agent, Channel.open(ext.ring), ext.id

    yield make
    for a in agents:
        a.close()
    for p in procs:
        p.kill()
        p.wait()
    ra.write_text(ra_before)


def recommend(device: str, action: str, value: str, **kw: object) -> Recommendation:
    base: dict[str, object] = dict(confidence=0.9, model="test", ttl_ms=10_000, ext_id=0)
    base.update(kw)
    return Recommendation(device, action, value, **base)  # type: ignore[arg-type]


def test_valid_recommendation_applied_and_audited(setup: Callable[..., tuple[Agent, Channel,
                                                                            int]],
                                                  loopdev: str, agent_dir: Path) -> None:
    agent, ch, ext_id = setup(window_s=0.2)
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    old = ra.read_text().strip()
    new = "512" if old != "512" else "256"
    sent = ch.submit(recommend(loopdev, "read_ahead_kb", new))
    assert sent is not None
    comps = pump(agent, ch, 2)
    assert [c.status for c in comps] == [Status.APPLIED, Status.KEPT]
    assert comps[0].seq == sent.seq and comps[0].old == old and comps[0].new == new
    assert "too little I/O" in comps[1].reason  # the device was idle
    assert ra.read_text().strip() == new
    audit = [r for r in read_jsonl(agent_dir / "audit.jsonl") if r["type"] == "decision"]
    assert [r["status"] for r in audit] == ["applied", "kept"]
    assert audit[0]["ext"] == ext_id and audit[0]["confidence"] == 0.9


def test_invalid_ones_rejected_and_agent_survives(setup: Callable[..., tuple[Agent, Channel,
                                                                             int]],
                                                  loopdev: str) -> None:
    agent, ch, _ = setup(policy=Policy(rate_per_s=0.001, burst=12))
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()
    bad = [
        recommend(loopdev, "read_ahead_kb", "99999999"),
        recommend("nosuchdev", "read_ahead_kb", "128"),
        recommend(loopdev, "format_disk", "1"),
        recommend(loopdev, "read_ahead_kb", "128", created_ns=time.time_ns() - 60 * 10**9),
        recommend(loopdev, "read_ahead_kb", "128", confidence=0.2),
        recommend(loopdev, "scheduler", "cfq"),
        recommend(loopdev, "demote_leg", "1"),
    ]
    for r in bad:
        assert ch.submit(r) is not None
    assert ch.submit_raw(b"\xff" * 256)              # garbage
    raw = bytearray(256)
    raw[0:4] = b"\x01\0\0\0"
    assert ch.submit_raw(bytes(raw))                 # bad checksum
    comps = pump(agent, ch, 9)
    assert all(c.status is Status.REJECTED for c in comps), comps
    reasons = [c.reason for c in comps]
    for expected in ("out of bounds", "unknown device", "not allowed", "expired",
                     "below the floor", "not one of", "no admin socket", "malformed",
                     "malformed"):
        assert any(expected in r for r in reasons), (expected, reasons)
    # A flood beyond the rate limit (12 tokens, ~no refill): 3 left, then refused.
    for i in range(40):
        ch.submit(recommend(loopdev, "read_ahead_kb", str(100 + i), confidence=0.1))
    comps = pump(agent, ch, 40)
    assert sum("rate limit" in c.reason for c in comps) == 37
    assert ra.read_text() == before
    # Still alive and serving.
    agent.step(0.01)
    assert agent.stats(loopdev).source == "ebpf"


def test_modes_observe_and_recommend_change_nothing(
        setup: Callable[..., tuple[Agent, Channel, int]], loopdev: str) -> None:
    agent, ch, _ = setup(mode="recommend")
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()
    ch.submit(recommend(loopdev, "read_ahead_kb", "1024"))
    (c,) = pump(agent, ch, 1)
    assert c.status is Status.RECOMMENDED and ra.read_text() == before
    Registry(agent.root).watch(loopdev, "observe")
    ch.submit(recommend(loopdev, "read_ahead_kb", "1024"))
    (c,) = pump(agent, ch, 1)
    assert c.status is Status.OBSERVED and ra.read_text() == before


def test_rollback_on_measured_regression(setup: Callable[..., tuple[Agent, Channel, int]],
                                         loopdev: str) -> None:
    """A tolerance of -100 % makes any measured latency a regression: this checks the
    rollback mechanics with real measurements and a real restore, not the detector's
    sensitivity (is_regression is tested on its own below)."""
    agent, ch, _ = setup(window_s=0.5, tolerance=-1.0, min_ios=5)
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    old = ra.read_text().strip()
    load = subprocess.Popen(["fio", "--name=load", f"--filename=/dev/{loopdev}", "--direct=1",
                             "--ioengine=psync", "--rw=randread", "--bs=4k", "--time_based",
                             "--runtime=20", "--rate_iops=500"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        ch.submit(recommend(loopdev, "read_ahead_kb", "2048"))
        applied, rolled = pump(agent, ch, 2)
    finally:
        load.kill()
        load.wait()
    assert applied.status is Status.APPLIED and applied.new == "2048"
    assert rolled.status is Status.ROLLED_BACK, rolled
    assert "regression: mean latency" in rolled.reason and "n/a" not in rolled.reason
    assert ra.read_text().strip() == old


def test_is_regression() -> None:
    from kernel_agent.agent import is_regression

    assert is_regression(100.0, 130.0, 0.25)
    assert not is_regression(100.0, 120.0, 0.25)
    assert not is_regression(None, 500.0, 0.25)
    assert not is_regression(100.0, None, 0.25)


def test_sigkill_of_extensions(bpf_ok: None, agent_dir: Path, instance: str) -> None:
    """Deaths are seen through pidfds: policy 'keep' marks the ublk server dead and keeps
    its device; policy 'remove' deletes it (here through a recording remover: the host
    has no ublk driver; the VM test deletes a real device); an ML extension is
    unregistered."""
    removed: list[int] = []
    reg = Registry(agent_dir)
    procs = {name: subprocess.Popen(["sleep", "600"]) for name in ("keep", "remove", "ml")}
    keep = reg.add("ublk-server", {"pid": str(procs["keep"].pid), "dev_id": "991",
                                   "policy": "keep"})
    rm = reg.add("ublk-server", {"pid": str(procs["remove"].pid), "dev_id": "992",
                                 "policy": "remove"})
    ml = reg.add("ml-extension", {"pid": str(procs["ml"].pid)})
    agent = Agent(agent_dir, instance=instance, remove_device=removed.append)
    try:
        agent.sync(force=True)
        for p in procs.values():
            p.send_signal(signal.SIGKILL)
            p.wait()
        t0 = time.monotonic()
        for _ in range(20):
            agent.step(0.05)
        assert time.monotonic() - t0 < 5
    finally:
        agent.close()
    assert removed == [992]
    left = {e.id: e for e in Registry(agent_dir).extensions()}
    assert set(left) == {keep.id} and left[keep.id].state == "dead"
    deaths = [r for r in read_jsonl(agent_dir / "audit.jsonl") if r.get("what") == "died"]
    assert {d["id"]: d["action"] for d in deaths} == {
        keep.id: "device 991 kept for recovery", rm.id: "device 992 removed",
        ml.id: "unregistered"}


def test_cli_daemon_end_to_end(bpf_ok: None, loopdev: str, agent_dir: Path,
                               instance: str) -> None:
    def agent(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "kernel_agent", *args],
                              capture_output=True, text=True, timeout=60)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()
    assert json.loads(agent("start", "--instance", instance, "--window", "0.2",
                            "--json").stdout)["source"] == "ebpf"
    try:
        agent("watch", loopdev, "--mode", "enforce")
        ext = json.loads(agent("add", "ml-extension", f"pid={os.getpid()}", "--json").stdout)
        time.sleep(0.5)  # the daemon picks the registry up within a tick
        fio(f"/dev/{loopdev}", "--ioengine=psync", "--rw=read", "--bs=64k",
            "--number_ios=100", "--size=32M")
        out = agent("recommend", "--ext", str(ext["id"]), loopdev, "read_ahead_kb", "768",
                    "--wait", "10")
        lines = [json.loads(x) for x in out.stdout.splitlines()]
        assert [x["status"] for x in lines] == ["applied", "kept"]
        assert ra.read_text().strip() == "768"
        bad = agent("recommend", "--ext", str(ext["id"]), loopdev, "read_ahead_kb", "-5",
                    "--wait", "10", check=False)
        assert bad.returncode == 1 and "out of bounds" in bad.stdout
        stats = json.loads(agent("stats", loopdev, "--json").stdout)
        assert stats["source"] == "ebpf"
        assert stats["ops"]["read"] == {"ios": 100, "bytes": 100 * 65536}
        text = agent("stats", loopdev).stdout
        assert "source ebpf" in text and "read" in text
    finally:
        agent("stop")
        ra.write_text(before)
    assert not (agent_dir / "agent.json").exists()
