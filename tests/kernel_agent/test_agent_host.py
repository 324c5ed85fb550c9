"""The agent end to end on the host: recommendations on a loop device, deaths.

Real components throughout: eBPF accounting, the ring file, /sys/block knobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel_agent.agent import RING_REFUSED, Agent
from kernel_agent.eventlog import read_jsonl
from kernel_agent.link import ExtensionLink
from kernel_agent.rcqueue import KernelQueue
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
        # These tests are the Python validator's, on the ring file (with the eBPF
        # checker loaded the agent refuses ring records: see the tests below).
        kw.setdefault("check_in_kernel", False)
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
        ext = json.loads(agent("add", "ml-extension", f"pid={os.getpid()}", "--json").stdout)
        other = json.loads(agent("add", "ml-extension", f"pid={os.getpid()}", "--json").stdout)
        agent("watch", loopdev, "--mode", "enforce", "--owner", str(ext["id"]))
        time.sleep(0.5)  # the daemon picks the registry up within a tick
        fio(f"/dev/{loopdev}", "--ioengine=psync", "--rw=read", "--bs=64k",
            "--number_ios=100", "--size=32M")
        # `agent recommend` takes the extension's path: the kernel queue, leases and all.
        refused = agent("recommend", "--ext", str(other["id"]), loopdev, "read_ahead_kb",
                        "768", "--wait", "10", check=False)
        assert "through its eBPF queue" in refused.stderr
        assert refused.returncode == 1 and json.loads(refused.stdout)["reason"] == (
            f"owner: {loopdev} is leased to extension {ext['id']}, not to extension "
            f"{other['id']}")
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


# -- the eBPF checker in the agent ------------------------------------------------------


def wait_answers(link: ExtensionLink, agent: Agent | None, seq: int, n: int,
                 timeout: float = 15) -> list[Completion]:
    """The first ``n`` answers to ``seq`` on the extension's ring (stepping ``agent``
    when it runs in this thread; a daemon or a thread answers on its own)."""
    got: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if agent is not None:
            agent.step(0.02)
        else:
            time.sleep(0.02)
        assert link.channel is not None
        got += [c for c in link.channel.completions() if c.seq == seq]
    assert len(got) >= n, f"only {len(got)} of {n} answers to seq {seq}: {got}"
    return got


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "kernel_agent", *args],
                          capture_output=True, text=True, timeout=60)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def daemon(bpf_ok: None, agent_dir: Path, instance: str) -> Iterator[dict[str, object]]:
    """``ublkml agent start``: the agent in its own process, as deployed."""
    state = json.loads(cli("start", "--instance", instance, "--window", "0.2",
                           "--json").stdout)
    try:
        yield state
    finally:
        cli("stop")


def connect(agent_dir: Path, **params: str) -> ExtensionLink:
    link = ExtensionLink("ml-extension", str(agent_dir), retry_s=0)
    why = link.connect({"pid": str(os.getpid()), **params})
    assert why is None, why
    return link


def test_foreign_device_refused_by_the_kernel_with_owner(daemon: dict[str, object],
                                                         loopdev: str, agent_dir: Path) -> None:
    """Two extensions; the loop device is leased to the first.  The second's
    recommendation for it goes through its own eBPF queue and rc_check refuses it:
    OWNER, naming the holder, in the completion the extension reads and in the audit."""
    assert daemon["checker"] == "ebpf", daemon
    Registry(agent_dir).watch(loopdev, "enforce")
    holder = connect(agent_dir, model="holder", device=loopdev)
    intruder = connect(agent_dir, model="intruder")
    try:
        assert (holder.checker, intruder.checker) == ("ebpf", "ebpf")
        assert isinstance(intruder.channel, KernelQueue)
        ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
        before = ra.read_text()
        sent = intruder.channel.submit(recommend(loopdev, "read_ahead_kb", "1024"))
        assert sent is not None
        (c,) = wait_answers(intruder, None, sent.seq, 1)
        assert c.status is Status.REJECTED, c
        assert c.reason == (f"owner: {loopdev} is leased to extension {holder.ext_id}, "
                            f"not to extension {intruder.ext_id}")
        assert ra.read_text() == before
        (entry,) = [r for r in read_jsonl(agent_dir / "audit.jsonl")
                    if r["type"] == "decision" and r["ext"] == intruder.ext_id]
        assert entry["checker"] == "ebpf" and entry["reason_code"] == "OWNER"
        assert entry["holders"] == [holder.ext_id] and entry["reason"] == c.reason
        assert entry["seq"] == sent.seq and entry["status"] == "rejected"
    finally:
        intruder.close()
        holder.close()


def test_kernel_approved_recommendation_is_applied(daemon: dict[str, object], loopdev: str,
                                                   agent_dir: Path) -> None:
    """End to end on a loop device: the extension registers claiming the device,
    submits read_ahead_kb in enforce mode through its eBPF queue, rc_check approves,
    the agent applies it, checks the effect and logs every step."""
    Registry(agent_dir).watch(loopdev, "enforce")
    link = connect(agent_dir, model="e2e", device=loopdev)
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()
    ext_id = link.ext_id
    try:
        assert link.checker == "ebpf" and isinstance(link.channel, KernelQueue)
        new = "640" if before.strip() != "640" else "320"
        sent = link.channel.submit(recommend(loopdev, "read_ahead_kb", new))
        assert sent is not None
        applied, kept = wait_answers(link, None, sent.seq, 2)
        assert applied.status is Status.APPLIED and applied.new == new, applied
        assert applied.old == before.strip()
        assert kept.status is Status.KEPT, kept
        assert ra.read_text().strip() == new
        status = json.loads(cli("status", "--json").stdout)
        assert status["checked_by"] == "recommendations checked by: eBPF (rc_check)"
        pin = Path(status["queues"][str(link.ext_id)])
        assert pin.name == f"rc_sub_{link.ext_id}" and pin.exists()
        assert "recommendations checked by: eBPF (rc_check)" in cli("status").stdout
    finally:
        link.close()
        ra.write_text(before)
    deadline = time.monotonic() + 5   # unregistered: the agent drops its queue pair
    while pin.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pin.exists() and not pin.with_name(f"rc_comp_{ext_id}").exists()
    audit = [r for r in read_jsonl(agent_dir / "audit.jsonl")
             if r["type"] == "decision" and r["ext"] == ext_id]
    assert [(r["status"], r["checker"]) for r in audit] == [("applied", "ebpf"),
                                                            ("kept", "ebpf")]
    assert audit[0]["reason_code"] == "OK" and audit[0]["new"] == new


def test_without_the_checker_the_python_validator_does_it_and_says_so(
        bpf_ok: None, loopdev: str, agent_dir: Path, instance: str, tmp_path: Path) -> None:
    """The object injected as missing: the agent falls back, says why (status, audit),
    and the same flow goes through the ring file and the Python validator."""
    agent = Agent(agent_dir, instance=instance, window_s=0.2,
                  recocheck_object=tmp_path / "missing" / "recocheck.bpf.o")
    worker = threading.Thread(target=agent.run)
    worker.start()
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()
    try:
        assert agent.checker == "python" and "missing" in agent.checker_reason
        Registry(agent_dir).watch(loopdev, "enforce")
        link = connect(agent_dir, model="fallback", device=loopdev)
        try:
            assert link.checker.startswith("python: the eBPF recommendation checker is "
                                           "unavailable"), link.checker
            assert isinstance(link.channel, Channel)
            new = "448" if before.strip() != "448" else "224"
            sent = link.channel.submit(recommend(loopdev, "read_ahead_kb", new))
            assert sent is not None
            applied, kept = wait_answers(link, None, sent.seq, 2)
            assert (applied.status, kept.status) == (Status.APPLIED, Status.KEPT)
            assert ra.read_text().strip() == new
            status = json.loads(cli("status", "--json").stdout)
            assert status["checker"] == "python" and status["queues"] == {
                str(link.ext_id): None}
            assert status["checked_by"].startswith(
                "recommendations checked by: Python validator: the eBPF recommendation "
                "checker is unavailable:")
            assert "Python validator: " in cli("status").stdout
        finally:
            link.close()
    finally:
        agent.stop()
        worker.join()
        agent.close()
        ra.write_text(before)
    audit = list(read_jsonl(agent_dir / "audit.jsonl"))
    assert audit[0]["what"] == "start" and audit[0]["checker"] == "python"
    assert "missing" in audit[0]["checker_reason"]
    assert [(r["status"], r["checker"]) for r in audit if r["type"] == "decision"] == [
        ("applied", "python"), ("kept", "python")]


def test_mode_and_lease_changes_reach_the_kernel(bpf_ok: None, loopdev: str, agent_dir: Path,
                                                  instance: str) -> None:
    """`agent mode` / `agent watch --owner` / `unwatch` edit the registry; the running
    agent mirrors each into rc_modes / rc_leases, and the kernel's verdicts follow."""
    agent = Agent(agent_dir, instance=instance, window_s=0.2)
    worker = threading.Thread(target=agent.run)
    worker.start()
    reg = Registry(agent_dir)
    try:
        assert agent.checker == "ebpf", agent.checker_reason
        reg.watch(loopdev, "observe")
        link = connect(agent_dir, model="modes")
        assert link.ext_id is not None and link.channel is not None
        try:
            def answer(value: str) -> Completion:
                assert link.channel is not None
                sent = link.channel.submit(recommend(loopdev, "read_ahead_kb", value))
                assert sent is not None
                return wait_answers(link, None, sent.seq, 1)[0]

            def settle() -> None:  # the agent picks registry changes up within a tick
                time.sleep(0.3)

            c = answer("128")
            assert c.status is Status.REJECTED and "leased to no extension" in c.reason, c
            reg.watch(loopdev, "observe", owner=link.ext_id)
            settle()
            c = answer("128")
            assert c.status is Status.OBSERVED and c.reason == f"{loopdev} is in observe mode"
            reg.watch(loopdev, "recommend")
            settle()
            c = answer("128")
            assert c.status is Status.RECOMMENDED, c
            c = answer("99999999")
            assert c.status is Status.REJECTED and c.reason == \
                "read_ahead_kb=99999999 out of bounds [0, 16384]"
            c = answer("many")    # no integer: the record carries no text, the kernel refuses
            assert c.status is Status.REJECTED and "out of bounds" in c.reason
            reg.unwatch(loopdev)
            settle()
            c = answer("128")
            assert c.status is Status.REJECTED and "unknown device" in c.reason
        finally:
            link.close()
    finally:
        agent.stop()
        worker.join()
        agent.close()
    codes = [r["reason_code"] for r in read_jsonl(agent_dir / "audit.jsonl")
             if r["type"] == "decision"]
    assert codes == ["OWNER", "OBSERVE", "OK", "BOUNDS", "BOUNDS", "DEVICE"]


def test_ring_records_are_refused_while_the_ebpf_checker_runs(
        bpf_ok: None, loopdev: str, agent_dir: Path, instance: str) -> None:
    """A client that writes its ring file itself would bypass the kernel's checks
    (leases first): with the eBPF checker loaded, each record is answered REJECTED
    with where to submit instead, and nothing is applied."""
    agent = Agent(agent_dir, instance=instance, window_s=0.2)
    try:
        assert agent.checker == "ebpf", agent.checker_reason
        reg = Registry(agent_dir)
        ext = reg.add("ml-extension", {"pid": str(os.getpid()), "device": loopdev,
                                        "mode": "enforce"})   # it even holds the lease
        agent.sync(force=True)
        ch = Channel.open(ext.ring)
        ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
        before = ra.read_text()
        try:
            sent = ch.submit(recommend(loopdev, "read_ahead_kb", "1536"))
            assert sent is not None
            assert ch.submit_raw(b"\xff" * 256)    # garbage: refused the same way
            comps = pump(agent, ch, 2)
        finally:
            ch.close()
        assert [(c.status, c.reason) for c in comps] == [(Status.REJECTED, RING_REFUSED)] * 2
        assert comps[0].seq == sent.seq and comps[0].device == loopdev
        assert "open_submitter" in RING_REFUSED
        assert ra.read_text() == before
    finally:
        agent.close()
    audit = [r for r in read_jsonl(agent_dir / "audit.jsonl") if r["type"] == "decision"]
    assert [(r["status"], r["checker"], r["reason_code"]) for r in audit] == [
        ("rejected", "ebpf", "RING")] * 2


def test_the_monitor_shares_a_lease_and_a_foreign_extension_is_refused(
        daemon: dict[str, object], loopdev: str, agent_dir: Path) -> None:
    """The device is leased to its owner (an extension registered with device=); the
    drive monitor claims it too.  Both may act on it through the kernel; a third
    extension, with no lease, is refused with OWNER naming both holders.  A claim
    on a device the agent does not watch grants nothing (logged), and a claim
    withdrawn takes the monitor's bit out of the kernel's lease."""
    assert daemon["checker"] == "ebpf", daemon
    owner = connect(agent_dir, model="legs", device=loopdev, mode="enforce")
    mon = ExtensionLink("monitor", str(agent_dir), retry_s=0)
    assert mon.connect({"pid": str(os.getpid()), "model": "drives",
                        "claims": f"{loopdev},ublkb4040"}) is None
    intruder = connect(agent_dir, model="intruder")
    ra = Path(f"/sys/block/{loopdev}/queue/read_ahead_kb")
    before = ra.read_text()

    def answer(link: ExtensionLink, value: str) -> list[Completion]:
        sent = link.submit(recommend(loopdev, "read_ahead_kb", value))
        assert sent is not None
        return wait_answers(link, None, sent.seq, 2 if link is not intruder else 1)

    try:
        assert (owner.checker, mon.checker, intruder.checker) == ("ebpf",) * 3
        assert owner.ext_id is not None and mon.ext_id is not None
        both = sorted((owner.ext_id, mon.ext_id))
        state = json.loads((agent_dir / "agent.json").read_text())
        assert state["devices"][loopdev]["holders"] == both
        assert [c.status for c in answer(mon, "896")] == [Status.APPLIED, Status.KEPT]
        assert ra.read_text().strip() == "896"
        assert [c.status for c in answer(owner, "384")] == [Status.APPLIED, Status.KEPT]
        (c,) = answer(intruder, "1024")
        assert (c.status, c.reason) == (Status.REJECTED, (
            f"owner: {loopdev} is leased to extensions {both[0]} and {both[1]}, not to "
            f"extension {intruder.ext_id}"))
        assert ra.read_text().strip() == "384"
        # The monitor no longer watches drives under the device: it loses its share.
        Registry(agent_dir).claim(mon.ext_id, [])
        time.sleep(0.3)   # the agent picks the registry up within a tick
        sent = mon.submit(recommend(loopdev, "read_ahead_kb", "512"))
        assert sent is not None
        (c,) = wait_answers(mon, None, sent.seq, 1)
        assert c.status is Status.REJECTED and c.reason == (
            f"owner: {loopdev} is leased to extension {owner.ext_id}, not to extension "
            f"{mon.ext_id}")
        ext_ids = (owner.ext_id, mon.ext_id, intruder.ext_id)
    finally:
        for link in (intruder, mon, owner):
            link.close()
        ra.write_text(before)
    audit = list(read_jsonl(agent_dir / "audit.jsonl"))
    assert {"type": "lease", "what": "claim-not-granted", "ext": ext_ids[1],
            "device": "ublkb4040", "reason": "ublkb4040 is not watched by the agent"} in [
        {k: r.get(k) for k in ("type", "what", "ext", "device", "reason")} for r in audit]
    leases = [r["holders"] for r in audit if r["type"] == "lease" and r["what"] == "holders"]
    assert sorted(ext_ids[:2]) in leases and leases[-1] == [ext_ids[0]]
    codes = [(r["ext"], r["reason_code"]) for r in audit if r["type"] == "decision"
             and r["status"] != "kept"]
    assert codes == [(ext_ids[1], "OK"), (ext_ids[0], "OK"), (ext_ids[2], "OWNER"),
                     (ext_ids[1], "OWNER")]


def test_a_link_follows_the_agent_when_it_restarts(bpf_ok: None, loopdev: str,
                                                   agent_dir: Path, instance: str) -> None:
    """An extension outlives its agent: a new agent adopts it with a new kernel queue,
    and the extension's next submission takes that one (the old queue has nobody
    draining it), then the answer comes, with the sequence numbers going on."""
    def started() -> tuple[Agent, threading.Thread]:
        agent = Agent(agent_dir, instance=instance, window_s=0.2)
        worker = threading.Thread(target=agent.run)
        worker.start()
        return agent, worker

    def stopped(agent: Agent, worker: threading.Thread) -> None:
        agent.stop()
        worker.join()
        agent.close()

    Registry(agent_dir).watch(loopdev, "recommend")
    agent, worker = started()
    link = connect(agent_dir, model="survivor", device=loopdev)
    try:
        assert link.checker == "ebpf"
        first = link.submit(recommend(loopdev, "read_ahead_kb", "128"))
        assert first is not None
        (c,) = wait_answers(link, None, first.seq, 1)
        assert c.status is Status.RECOMMENDED, c
        old_pin = link.channel.pin if isinstance(link.channel, KernelQueue) else None
        stopped(agent, worker)
        agent, worker = started()
        second = link.submit(recommend(loopdev, "read_ahead_kb", "256"))
        assert second is not None and second.seq == first.seq + 1
        (c,) = wait_answers(link, None, second.seq, 1)
        assert c.status is Status.RECOMMENDED, c
        assert link.checker == "ebpf" and isinstance(link.channel, KernelQueue)
        assert old_pin is not None and link.channel.pin == old_pin   # same name, new map
    finally:
        link.close()
        stopped(agent, worker)
    audit = [r for r in read_jsonl(agent_dir / "audit.jsonl") if r["type"] == "decision"]
    assert [(r["seq"], r["status"], r["checker"]) for r in audit] == [
        (first.seq, "recommended", "ebpf"), (second.seq, "recommended", "ebpf")]
