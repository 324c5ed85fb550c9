"""The host-wide drive monitor on the host: real loop devices, real eBPF, real fio.

The host has no dm-delay, so the end-to-end slow drive here is a loop device
stacked on another whose reads the kernel's blkio throttling holds back: the
upper loop's requests stay in flight while its worker waits, which is what
the block tracepoints see.  The flagging logic alone (hysteresis, the
baseline of a lone drive, recovery) is checked with a fake sample source;
the test says so.  Drives in the test bed (dm-delay, NVMe, SMART) are in
tests/ml/test_monitor_ublk.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_agent.accounting import BlockDevice, bpf_unavailable_reason
from kernel_agent.agent import Agent
from kernel_agent.eventlog import read_jsonl
from kernel_agent.registry import Registry
from ml.model import reference_model
from ml.monitor import (
    AgentLink,
    Baseline,
    Counters,
    DeviceInfo,
    Monitor,
    MonitorConfig,
    MonitorError,
    PathInfo,
    SampleRing,
    SmartPoller,
    build_topology,
    difference,
    fit_baseline,
    paths_of,
    read_state,
)
from ml.monitor._drives import fs_device, whole_device
from ml.smart import parse_smartctl_json
from ublk_driver.drive_verdicts import read_verdicts

THROTTLE = Path("/sys/fs/cgroup/blkio/blkio.throttle.read_iops_device")


# ---- a fake sample source (only for the flagging logic) ------------------------------


class FakeSource:
    """Cumulative counters from a latency schedule: ``lat[name](t)`` microseconds at
    ``iops`` 4 KiB I/Os per second, with a few percent of seeded noise."""

    ebpf = True
    note = ""

    def __init__(self, lat: dict[str, Any], iops: float = 200.0, seed: int = 1,
                 errors: dict[str, int] | None = None) -> None:
        self.lat = lat
        self.errors = errors or {}   # name -> failed I/Os per second
        self.iops = iops
        self.rng = np.random.default_rng(seed)
        self.t = 0.0
        self.c: dict[str, list[float]] = {}

    def add(self, bd: BlockDevice) -> tuple[str, str]:
        self.c[bd.name] = [0, 0, 0, 0]
        return "ebpf", "fake"

    def remove(self, bd: BlockDevice) -> None:
        self.c.pop(bd.name, None)

    def advance(self, dt: float) -> None:
        self.t += dt
        for name, c in self.c.items():
            n = self.iops * dt * self.rng.uniform(0.9, 1.1)
            c[0] += n
            c[1] += n * 4096
            c[2] += n * self.lat[name](self.t) * 1e3 * self.rng.uniform(0.95, 1.05)
            c[3] += self.errors.get(name, 0) * dt

    def read(self, bd: BlockDevice) -> Counters:
        c = self.c[bd.name]
        return Counters(int(c[0]), int(c[1]), int(c[2]), int(c[3]))

    def close(self) -> None:
        pass


_made: list[Monitor] = []


@pytest.fixture(autouse=True)
def _stop_monitors() -> Iterator[None]:
    yield
    while _made:
        _made.pop().stop()


def _monitor(tmp_path: Path, src: FakeSource, names: list[str], **over: Any) -> Monitor:
    opts: dict[str, Any] = {"baseline_s": 15, **over}
    cfg = MonitorConfig(interval_s=1.0, window_s=10.0, discover=False, smart=False,
                        agent=False, nice=None, state_dir=str(tmp_path / "state"),
                        agent_dir=str(tmp_path / "agent"), **opts)
    mon = Monitor(cfg, source=src)  # type: ignore[arg-type]
    _made.append(mon)
    mon._adopt(build_topology([BlockDevice(n, 250, i) for i, n in enumerate(names)], []))
    return mon


def _run(mon: Monitor, src: FakeSource, seconds: int) -> list[dict[str, tuple[float | None,
                                                                              bool]]]:
    out = []
    for _ in range(seconds):
        src.advance(1.0)
        mon.tick(now=src.t)
        out.append({n: (st.verdict.score if st.verdict else None, st.flagged)
                    for n, st in mon.drives.items()})
    return out


def test_peers_flag_the_slow_drive_only(tmp_path: Path) -> None:
    """Fake sample source (the rest is real: the packaged model, onnxruntime, the
    windows, the hysteresis): sdc turns 4x slower at t=40 s and recovers at 90 s."""
    def slow(t: float) -> float:
        return 400.0 if 40 <= t < 90 else 100.0
    src = FakeSource({"sda": lambda t: 100.0, "sdb": lambda t: 110.0, "sdc": slow})
    mon = _monitor(tmp_path, src, ["sda", "sdb", "sdc"], flag_after=3, clear_after=5)
    ticks = _run(mon, src, 130)
    flagged_at = [i + 1 for i, t in enumerate(ticks) if t["sdc"][1]]
    assert flagged_at and 40 < flagged_at[0] <= 40 + 10, flagged_at[:3]
    assert not any(t["sda"][1] or t["sdb"][1] for t in ticks)
    assert not ticks[-1]["sdc"][1], "the flag must clear after the drive recovered"
    assert all(t["sdc"][1] for t in ticks[flagged_at[0] - 1:88])
    kinds = [a["kind"] for a in mon.alerts]
    assert kinds.count("fail_slow") == 1 and kinds.count("recovered") == 1
    # The rings stayed at their size: the tick allocates nothing that grows.
    assert all(st.ring.ts.size == st.ring.capacity == 2 * 10 + 8
               for st in mon.drives.values())


def test_lone_drive_is_judged_against_its_own_baseline(tmp_path: Path) -> None:
    """Fake sample source: one drive, healthy for 60 s, then 5 ms slower (the
    test-bed test's dm-delay step) - no peer, so its baseline must catch it."""
    src = FakeSource({"nvme0n1": lambda t: 300.0 if t < 60 else 5300.0})
    mon = _monitor(tmp_path, src, ["nvme0n1"])
    ticks = _run(mon, src, 80)
    st = mon.drives["nvme0n1"]
    assert ticks[5]["nvme0n1"][0] is None, "scored before it had a baseline"
    assert all(t["nvme0n1"][0] is not None for t in ticks[20:60])
    assert not any(t["nvme0n1"][1] for t in ticks[:60])
    first = next(i + 1 for i, t in enumerate(ticks) if t["nvme0n1"][1])
    assert 60 < first <= 72, first
    assert st.verdict is not None and st.verdict.judged_by == "baseline"
    assert st.baseline.state == "ready"
    assert "own baseline" in mon.alerts[-1]["message"]


def test_no_peer_and_no_baseline_is_not_a_verdict(tmp_path: Path) -> None:
    """Fake sample source: without peers and before its baseline, a drive gets a
    reason, not a score - never a flag."""
    src = FakeSource({"sda": lambda t: 100.0})
    mon = _monitor(tmp_path, src, ["sda"], baseline_s=1000)
    _run(mon, src, 12)
    v = mon.drives["sda"].verdict
    assert v is not None and v.score is None and "learning its own baseline" in v.reason


def test_io_errors_alert_at_most_once_a_minute(tmp_path: Path) -> None:
    """Fake sample source: sdb fails 2 I/Os a second for 150 s: three alerts (0, 60,
    120 s), each with the count since the last, and every error counted."""
    src = FakeSource({"sda": lambda t: 100.0, "sdb": lambda t: 100.0}, errors={"sdb": 2})
    mon = _monitor(tmp_path, src, ["sda", "sdb"])
    _run(mon, src, 150)
    alerts = [a for a in mon.alerts if a["kind"] == "io_errors"]
    assert [a["drive"] for a in alerts] == ["sdb"] * 3, alerts
    assert alerts[1]["message"].startswith("120 I/O error(s) on sdb")
    assert mon.drives["sdb"].errors_total == 298 and mon.drives["sda"].errors_total == 0


# ---- pieces -------------------------------------------------------------------------


def test_sample_ring_window_and_bounds() -> None:
    ring = SampleRing(5)
    prev = Counters(0, 0, 0, 0)
    for i in range(1, 9):
        cur = Counters(i * 10, i * 40960, i * 10 * 200_000, i // 4)
        s = difference(prev, cur, float(i), 1.0)
        assert s is not None and s.latency_us == 200.0 and s.throughput_bps == 40960.0
        ring.add(s)
        prev = cur
    ts, lat, tput = ring.window(since=5.0)
    assert set(tput) == {40960.0}
    assert list(ts) == [6.0, 7.0, 8.0] and set(lat) == {200.0}
    assert ring.window(since=0.0)[0].size == 5   # the ring holds the last 5 only
    assert ring.errors_since(0.0) == 2           # errors at i=4 and i=8, both kept
    assert ring.errors_since(5.0) == 1
    assert difference(cur, Counters(5, 0, 0, 0), 9.0, 1.0) is None  # went backwards
    idle = difference(cur, cur, 9.0, 1.0)
    assert idle is not None and idle.ios == 0
    ring.add(idle)
    assert ring.window(since=5.0)[0].tolist() == [6.0, 7.0, 8.0]  # no I/O: no sample


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(1.0, 1e9), min_size=8, max_size=200),
       st.floats(10.0, 1e4), st.floats(0.0, 1e-3))
def test_fit_baseline_is_finite_and_positive(tput: list[float], a: float, b: float) -> None:
    t = np.array(tput)
    y = a + b * t
    fit = fit_baseline(t, y)
    exp = fit.expected(t)
    assert np.all(np.isfinite(exp)) and np.all(exp > 0)
    assert 0 < fit.ratio_q[0] <= fit.ratio_q[1] <= fit.ratio_q[2]
    assert abs(fit.ratio_q[0] - 1.0) < 0.05   # exact data: the fit is on it


def test_baseline_is_bounded() -> None:
    b = Baseline(learn_samples=10, capacity=50, refit_every=5)
    for i in range(1000):
        b.add(1000.0 + i % 7, 100.0 + i % 3)
    t, y = b.samples()
    assert t.size == y.size == 50 and b.state == "ready" and b.fit is not None


def test_status_paths_new_and_old_replies(tmp_path: Path) -> None:
    new = {"paths": [{"index": 0, "name": "leg0", "backing": "/a",
                      "drives": [{"name": "nvme0n1", "dev": "259:0"}], "no_drive": None},
                     {"index": 1, "name": "leg1", "backing": "/b", "drives": [],
                      "no_drive": "tmpfs has no block device"}],
           "legs": [{"leg": 0, "errors": 3}, {"leg": 1, "errors": 0}],
           "target": {"target": "mirror", "legs": ["/a", "/b"]}}
    p = paths_of(new)
    assert [x.drives[0].name for x in p[:1]] == ["nvme0n1"] and p[0].errors == 3
    assert p[1].drives == [] and p[1].no_drive == "tmpfs has no block device"

    # A server without "paths": its target's backing files, mapped here.
    class Drive:  # stands in for ublk_driver.drives.Drive
        def __init__(self, name: str, dev: str) -> None:
            self.name, self.dev = name, dev

    old = {"target": {"target": "loop", "backing": "/x"},
           "stats": {"queues": [{"errors": 2}, {"errors": 1}]}}
    p = paths_of(old, drives_of=lambda path: (Drive("sdb", "8:16"),))
    assert len(p) == 1 and p[0].drives[0].majmin == "8:16" and p[0].errors == 3
    p = paths_of({"target": {"target": "null"}})
    assert p[0].drives == [] and "no backing file" in (p[0].no_drive or "")


def test_named_drive_errors(tmp_path: Path) -> None:
    with pytest.raises(MonitorError, match="--drive /nonexistent"):
        Monitor(MonitorConfig(drives=("/nonexistent",), smart=False, agent=False,
                              use_bpf=False, discover=False, nice=None))
    with pytest.raises(MonitorError, match="at least 3 intervals"):
        MonitorConfig(interval_s=5, window_s=10).check()


# ---- the real thing on the host -------------------------------------------------------


def _losetup(*args: str) -> str:
    return subprocess.run(["losetup", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def drives(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Three peers, each a loop device stacked on another over a file with data
    (ext4 on the host's disk): {"a", "b", "c"} -> the upper loopN, and
    {"a_lower", ...} -> the one below it."""
    if os.geteuid() != 0:
        pytest.fail("the monitor's host test needs root (loop devices, eBPF)")
    made: list[str] = []
    out: dict[str, str] = {}
    try:
        for k in ("a", "b", "c"):
            img = tmp_path / f"{k}.img"
            with open(img, "wb") as f:
                f.write(os.urandom(32 << 20))  # data, not holes: reads reach the disk
            lower = _losetup("-f", "--show", "--direct-io=on", str(img))
            made.append(lower)
            upper = _losetup("-f", "--show", "--direct-io=on", lower)
            made.append(upper)
            out[k], out[f"{k}_lower"] = os.path.basename(upper), os.path.basename(lower)
        yield out
    finally:
        for p in reversed(made):
            subprocess.run(["losetup", "-d", p], check=False)


def _throttle(dev: str, iops: int) -> None:
    THROTTLE.write_text(f"{dev} {iops}")


def test_monitor_flags_a_throttled_loop_device(tmp_path: Path,
                                                drives: dict[str, str]) -> None:
    """Three peers under fio; the reads of the loop under one of them are throttled
    (blkio) from 6 s on: the monitor (eBPF) flags that one within 8 s, and never
    the others; the state file, the alert log and `monitor status` say so."""
    reason = bpf_unavailable_reason()
    if reason:
        pytest.fail(f"eBPF accounting is not usable here: {reason}")
    if not THROTTLE.exists():
        pytest.fail(f"{THROTTLE} is missing: this test needs cgroup v1 blkio throttling")
    if shutil.which("fio") is None:
        pytest.fail("fio is missing (scripts/setup.sh installs it)")
    env = {**os.environ, "UBLKML_STATE_DIR": str(tmp_path / "state"),
           "UBLKML_AGENT_DIR": str(tmp_path / "agent")}
    peers = [drives["a"], drives["b"], drives["c"]]
    lower = whole_device(drives["c_lower"])
    fios = [subprocess.Popen(["fio", f"--name={d}", f"--filename=/dev/{d}", "--direct=1",
                              "--rw=randread", "--bs=4k", "--iodepth=4",
                              "--ioengine=io_uring", "--rate_iops=2000", "--time_based",
                              "--runtime=18", "--output=/dev/null"])
            for d in peers]
    cmd = [sys.executable, "-m", "ublk_driver", "monitor", "run", "--no-devices",
           *[f"--drive=/dev/{d}" for d in peers], "--interval=0.5", "--window=6",
           "--flag-after=4", "--smart-interval=5", "--duration=14", "--json",
           "--no-agent", "--nice=0"]
    try:
        mon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
        time.sleep(6.0)
        _throttle(lower.majmin, 200)
        throttled_at = time.time()
        out, err = mon.communicate(timeout=60)
    finally:
        _throttle(lower.majmin, 0)
        for p in fios:
            p.kill()
            p.wait()
    assert mon.returncode == 0, err
    ticks = [json.loads(line) for line in out.splitlines()]
    assert len(ticks) >= 22, (len(ticks), err)
    top = drives["c"]
    for t in ticks:
        assert not t["drives"][drives["a"]]["flagged"], t
        assert not t["drives"][drives["b"]]["flagged"], t
    first = next((i for i, t in enumerate(ticks) if t["drives"][top]["flagged"]), None)
    assert first is not None, f"{top} never flagged:\n{err}"
    delay = ticks[first]["ts"] - throttled_at
    print(f"flagged {delay:.1f} s after the throttle")
    assert 0 < delay <= 8.0, delay
    assert ticks[-1]["drives"][top]["slow"]
    assert ticks[-1]["drives"][top]["features"]["peer_lat_ratio"] > 2, ticks[-1]

    state = read_state(str(tmp_path / "state"))
    assert state is not None and state["version"] == 1
    assert set(state["drives"]) == set(peers)
    for name, d in state["drives"].items():
        assert d["source"] == "ebpf" and d["dev"] == whole_device(name).majmin
        assert d["named"] and d["users"] == [] and d["samples"] >= 4
        assert {"peer_lat_ratio", "lat_p50_us", "throughput_bps"} <= set(d["features"])
        assert d["judged_by"] == "peers" and isinstance(d["score"], float)
        assert d["baseline"]["state"] in ("learning", "ready")
        sm = d["smart"]
        if shutil.which("smartctl"):  # a loop device has no SMART: smartctl says so
            assert sm["checked_at"] is not None and sm["risk"] is None
            assert "Unable to detect device type" in sm["error"], sm
    assert state["drives"][top]["flagged"] and "peer" in state["drives"][top]["reason"]
    assert state["ebpf"]["available"] and state["stats"]["errors"] == 0
    # The driver's file for `ublkml status`: the same verdicts, the writer gone.
    pub = read_verdicts(str(tmp_path / "state"))
    assert pub is not None and pub.by == "monitor" and not pub.writer_alive()
    assert pub.drives[top].state == "SLOW" and pub.drives[top].score is not None
    assert pub.drives[drives["a"]].state == pub.drives[drives["b"]].state == "ok"
    assert state["stats"]["tick_ms_p50"] < 100
    log = [json.loads(line) for line in
           (tmp_path / "agent" / "monitor.jsonl").read_text().splitlines()]
    assert [r["drive"] for r in log if r.get("kind") == "fail_slow"] == [top]

    st = subprocess.run([sys.executable, "-m", "ublk_driver", "monitor", "status"],
                        capture_output=True, text=True, env=env, check=False)
    assert st.returncode == 0, st.stderr
    assert "NOT RUNNING" in st.stdout  # it stopped after --duration
    line = next(x for x in st.stdout.splitlines() if x.startswith(top + " "))
    assert "SLOW" in line and "ebpf" in line and "--drive" in line
    js = json.loads(subprocess.run([sys.executable, "-m", "ublk_driver", "monitor", "status",
                                    "--json"], capture_output=True, text=True, env=env,
                                   check=True).stdout)
    assert js["running"] is False and js["drives"][top]["slow"] is True


def test_status_without_a_monitor(tmp_path: Path) -> None:
    env = {**os.environ, "UBLKML_STATE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "ublk_driver", "monitor", "status"],
                       capture_output=True, text=True, env=env, check=False)
    assert p.returncode == 1 and "no monitor state" in p.stderr and p.stderr.count("\n") == 1


def test_fs_device_of_a_file(tmp_path: Path) -> None:
    """A file's file-system device is a whole disk (a partition's disk)."""
    f = tmp_path / "x"
    f.write_text("x")
    bd = fs_device(str(f))
    if bd is not None:  # /tmp on a block device (not tmpfs)
        assert (Path("/sys/block") / bd.name).exists()
    assert fs_device("/proc/self/status") is None


def test_smart_alert_recommends_demote_leg_through_the_agent(tmp_path: Path) -> None:
    """Fake sample source and a SMART reader that returns a saved smartctl document
    (what smartctl prints for an NVMe drive whose controller sets critical warning
    bit 2); the rest is real: the failure model, the alert log, the registration as
    a ``monitor`` extension, the ring, and an agent (no eBPF) that validates the
    ``demote_leg`` - and rejects it, since no ublkb7 exists on this host."""
    doc = {"smartctl": {"version": [7, 3], "exit_status": 8},
           "device": {"name": "/dev/nvme0n1", "type": "nvme", "protocol": "NVMe"},
           "smart_status": {"passed": False, "nvme": {"value": 4}},
           "nvme_smart_health_information_log": {"critical_warning": 4, "temperature": 40,
                                                 "power_on_hours": 9, "media_errors": 0}}
    agent_dir = tmp_path / "agent"
    agent = Agent(agent_dir, use_bpf=False)
    try:
        poller = SmartPoller(reference_model("failure"), interval_s=3600,
                             reader=lambda dev: parse_smartctl_json(json.dumps(doc), dev))
        src = FakeSource({"nvme0n1": lambda t: 100.0, "nvme1n1": lambda t: 100.0})
        cfg = MonitorConfig(interval_s=1.0, window_s=10.0, discover=False, smart=True,
                            nice=None, state_dir=str(tmp_path / "state"),
                            agent_dir=str(agent_dir))
        mon = Monitor(cfg, source=src, smart=poller,  # type: ignore[arg-type]
                      agent=AgentLink(str(agent_dir), retry_s=0))
        _made.append(mon)
        drives = [BlockDevice("nvme0n1", 259, 0), BlockDevice("nvme1n1", 259, 1)]
        info = DeviceInfo(7, "/dev/ublkb7", "mirror", True,
                          [PathInfo(i, f"/mnt/{i}/leg.img", [d], None, 0)
                           for i, d in enumerate(drives)])
        mon._adopt(build_topology([], [info]))
        # What the SMART thread would do for the drives it tracks: read them now.
        for d in drives:
            poller._results.append(poller.check_now(d.name, f"/dev/{d.name}", "start"))
        src.advance(1.0)
        mon.tick(now=src.t)
        assert [a["kind"] for a in mon.alerts].count("smart") == 2
        alert = mon.alerts[0]
        assert alert["critical"] and "reliability degraded" in alert["message"]
        assert alert["actions"][0]["status"] == "sent", alert
        assert [e.cls for e in Registry(agent_dir).extensions()] == ["monitor"]
        for _ in range(20):
            agent.step(0.01)
        src.advance(1.0)
        mon.tick(now=src.t)
        acts = mon.drives["nvme0n1"].actions
        assert acts[0]["device"] == "ublkb7" and acts[0]["value"] == "0"
        assert acts[0]["status"] == "rejected" and "not watched" in acts[0]["reason"]
        state = read_state(str(tmp_path / "state"))
        assert state is not None and state["agent"]["ext_id"] is not None
        assert state["drives"]["nvme1n1"]["smart"]["critical_warning"] == 4
        assert state["drives"]["nvme1n1"]["flagged"] and not state["drives"]["nvme1n1"]["slow"]
        mon.stop()
        _made.remove(mon)
        assert Registry(agent_dir).extensions() == []   # unregistered on stop
        log = list(read_jsonl(agent_dir / "monitor.jsonl"))
        assert {r.get("what") for r in log} >= {"registered", "recommend", "answer"}
    finally:
        agent.close()


def test_discovers_a_device_and_its_drives_through_the_admin_socket(
        tmp_path: Path, drives: dict[str, str]) -> None:
    """A real admin socket (AdminServer) in front of a stand-in server
    (tests/ublk_driver/admin/doubles.FakeServer: a mirror whose leg 0 is on a real
    loop device, leg 1 on no drive): the monitor finds the device in the state dir,
    its paths and drives from `status`, measures the loop device with eBPF and
    forgets it when the device goes away."""
    from tests.ublk_driver.admin.doubles import FakeLeg, FakeServer, serve
    from ublk_driver.drives import Drive
    from ublk_driver.targets import CompletionPath

    lo = whole_device(drives["a"])
    fake = FakeServer(paths=[
        CompletionPath(0, "leg0", "/data/leg0.img", (Drive(lo.name, lo.major, lo.minor),)),
        CompletionPath(1, "leg1", "/dev/shm/leg1.img", (), "on tmpfs: no block device")],
        legs=[FakeLeg(0, errors=3), FakeLeg(1)])
    with serve(fake) as served:
        cfg = MonitorConfig(discover=True, smart=False, agent=False, nice=None,
                            state_dir=served.state_dir, agent_dir=str(tmp_path / "agent"))
        mon = Monitor(cfg)
        _made.append(mon)
        mon._adopt(mon.discover())
        state = mon.snapshot()
    dev = state["devices"]["7"]
    assert dev["mirror"] and dev["error"] is None and dev["bdev"] == "/dev/ublkb7"
    assert [p["drives"] for p in dev["paths"]] == [[lo.name], []]
    assert dev["paths"][1]["no_drive"] == "on tmpfs: no block device"
    d = state["drives"][lo.name]
    assert d["users"] == [{"dev_id": 7, "path": 0, "leg": True, "backing": "/data/leg0.img"}]
    assert d["measured_at"] == lo.name and d["source"] == "ebpf" and not d["named"]
    assert d["server_errors"] == 3
    # The socket is gone: the device, and with it the drive, are forgotten.
    mon._adopt(mon.discover())
    assert mon.drives == {} and mon.topology.devices == {}
    assert mon.alerts[-1]["message"].startswith(f"{lo.name} is no longer under any device")
