"""The host-wide drive monitor end to end, in the test bed: emulated NVMe drives,
ext4, dm-delay, real ublkml devices, fio, eBPF, smartctl and the agent.

Marked ``ublk``: natively where /dev/ublk-control exists, else in the test bed.

* Peers: a ublkml loop device on each emulated NVMe drive (a file on ext4; on
  nvme0 a dm-delay sits between the disk and its file system), and a mirror
  with a leg on each; fio on both loop devices.  Healthy for a while (10
  minutes in ``make soak``), nobody is flagged; then dm-delay adds 10 ms to
  nvme0's reads: the monitor flags nvme0, within 30 s, and never nvme1.  Then
  nvme1's controller reports a critical warning (qemu, through QMP): a SMART
  alert within one SMART interval (5 s) plus smartctl's own time, and a
  ``demote_leg`` of the mirror's leg on nvme1, applied by the agent.
* Alone: one loop device on an NVMe drive (dm-delay between it and ext4), no
  peer with I/O: the monitor learns its baseline, then dm-delay goes from 0 to
  5 ms and the drive is flagged against its own history within 30 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel_agent.agent import Agent
from kernel_agent.eventlog import read_jsonl
from kernel_agent.registry import Registry
from tests.ublk_driver.ublk_helpers import Device, device, sh
from ublk_driver.admin import AdminClient
from ublk_driver.testbed.emulator import EmulatedDrive, set_smart_critical_warning

pytestmark = pytest.mark.ublk

SMART_INTERVAL = 5.0


@contextlib.contextmanager
def dm_delay(name: str, disk: str) -> Iterator[tuple[str, Callable[[int], None]]]:
    """A dm-delay device over ``disk`` (no delay yet): its /dev/dm-N, and a function
    that sets the read delay in ms (table reload: suspend, reload, resume)."""
    subprocess.run(["modprobe", "dm_delay"], check=False, capture_output=True)
    sectors = int(Path(f"/sys/block/{os.path.basename(disk)}/size").read_text())

    def table(ms: int) -> str:
        return f"0 {sectors} delay {disk} 0 {ms} {disk} 0 0"

    sh("dmsetup", "create", "--noudevsync", name, "--table", table(0))
    try:
        minor = sh("dmsetup", "info", "-c", "--noheadings", "-o", "minor", name).stdout.strip()

        def set_delay(ms: int) -> None:
            sh("dmsetup", "suspend", "--noudevsync", name)
            try:
                sh("dmsetup", "reload", "--noudevsync", name, "--table", table(ms))
            finally:
                sh("dmsetup", "resume", "--noudevsync", name)

        yield f"/dev/dm-{minor}", set_delay
    finally:
        sh("dmsetup", "remove", "--noudevsync", name, check=False)


@contextlib.contextmanager
def ext4(dev: str, mnt: Path) -> Iterator[Path]:
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
    mnt.mkdir(parents=True)
    sh("mount", dev, str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt), check=False)


def backing(path: Path, mib: int) -> str:
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "status=none")
    return str(path)


class MonitorRun:
    """``ublkml monitor run --json`` in the background; its tick lines as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "ublk_driver", "monitor", "run",
             "--json", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ticks: list[dict[str, Any]] = []
        self.err: list[str] = []
        self.started = time.time()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.ticks.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_for(self, what: Callable[[dict[str, Any]], bool], timeout: float,
                 since: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for t in self.ticks[seen:]:
                if t["ts"] >= since and what(t):
                    return t
            seen = len(self.ticks)
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.2)
        last = self.ticks[-1] if self.ticks else None
        raise AssertionError(f"not seen within {timeout:g} s; last tick {last}\n"
                             f"{self.stacks()}")

    def stacks(self) -> str:
        """Where a stuck monitor is: SIGABRT makes faulthandler print every thread."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            for t in self._readers:
                t.join(5)
        return "".join(self.err)

    def wait_started(self, timeout: float) -> None:
        """Until its start-up line (models loaded, drives found) is on stderr."""
        deadline = time.monotonic() + timeout
        while not any("watching" in line for line in self.err):
            assert self.proc.poll() is None, "".join(self.err)
            assert time.monotonic() < deadline, f"not started in {timeout:g} s: {self.stacks()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def fio_load(dev: str, seconds: float, iops: int) -> subprocess.Popen[bytes]:
    """fio reading ``dev`` for ``seconds`` in the background.

    ``--thread``: the job runs in this one process, so that killing and waiting
    for it really closes ``dev``.  By default fio forks a process per job, and
    a SIGKILL to the parent leaves that job running, orphaned, with ``dev``
    open until its ``--runtime`` ends; the kernel frees a deleted ublk device
    only once its last opener has closed it, so ``ublkml del`` waited for it.
    """
    return subprocess.Popen(["fio", "--name=m", f"--filename={dev}", "--direct=1",
                             "--rw=randread", "--bs=4k", "--iodepth=8", "--ioengine=io_uring",
                             f"--rate_iops={iops}", "--time_based", f"--runtime={int(seconds)}",
                             "--thread", "--output=/dev/null"], stdout=subprocess.DEVNULL)


@pytest.fixture
def state_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A state dir of our own (the devices' sockets, monitor.json) and an agent dir."""
    state, agent = tmp_path / "state", tmp_path / "agent"
    monkeypatch.setenv("UBLKML_STATE_DIR", str(state))
    monkeypatch.setenv("UBLKML_AGENT_DIR", str(agent))
    return state, agent


def _flagged(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda t: bool(t["drives"].get(name, {}).get("slow"))


def test_monitor_flags_the_slow_nvme_then_a_critical_one(
        emulated_drives: list[EmulatedDrive], tmp_path: Path, state_dirs: tuple[Path, Path],
        soak_count: Callable[[int, int], int]) -> None:
    nvme0, nvme1 = (next(d for d in emulated_drives if d.qemu_id == q)
                    for q in ("nvme0", "nvme1"))
    healthy_s = soak_count(15, 600)
    state, agent_dir = state_dirs
    with contextlib.ExitStack() as stack:
        dm, set_delay = stack.enter_context(dm_delay("ublkml-mon-nvme0", nvme0.path))
        fs0 = stack.enter_context(ext4(dm, tmp_path / "fs0"))
        fs1 = stack.enter_context(ext4(nvme1.path, tmp_path / "fs1"))
        loop0: Device = stack.enter_context(device("-t", "loop", "-f",
                                                   backing(fs0 / "b.img", 64)))
        loop1: Device = stack.enter_context(device("-t", "loop", "-f",
                                                   backing(fs1 / "b.img", 64)))
        mirror: Device = stack.enter_context(device(
            "-t", "mirror", "--leg", backing(fs0 / "leg0.img", 16),
            "--leg", backing(fs1 / "leg1.img", 16)))
        stack.callback(set_smart_critical_warning, nvme1, 0)  # the drives are shared
        stack.callback(set_delay, 0)   # the drive at full speed again before teardown
        # The agent, in enforce mode for the mirror, so that a demotion is applied;
        # its recommendations checked in the kernel (eBPF), leases included.
        Registry(agent_dir).watch(os.path.basename(mirror.bdev), mode="enforce")
        agent = Agent(agent_dir, instance=f"montest{os.getpid()}")
        assert agent.checker == "ebpf", agent.checker_reason
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()

        def stop_agent() -> None:
            agent.stop()
            runner.join(10)
            agent.close()
        stack.callback(stop_agent)
        mon = MonitorRun("--interval=1", "--window=15", "--flag-after=5", "--rescan=2",
                         f"--smart-interval={SMART_INTERVAL:g}")
        stack.callback(mon.stop)
        mon.wait_started(120)
        load_s = healthy_s + 120
        for d in (loop0, loop1):
            p = fio_load(d.bdev, load_s, 500)
            stack.callback(p.wait)
            stack.callback(p.kill)

        # Both drives seen, each under its device, measured where its latency is.
        first = mon.wait_for(lambda t: all(t["drives"].get(d.name, {}).get("score")
                                           is not None for d in (nvme0, nvme1)), 60)
        # The state file is rewritten at most once a second: it may still hold the
        # tick before the one seen on stdout.
        deadline = time.monotonic() + 10
        while True:
            doc = json.loads((state / "monitor.json").read_text())
            d0, d1 = doc["drives"][nvme0.name], doc["drives"][nvme1.name]
            if d0["judged_by"] is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert d0["measured_at"] == os.path.basename(dm) and d0["source"] == "sysfs"
        assert d1["measured_at"] == nvme1.name and d1["source"] == "ebpf"
        assert {(u["dev_id"], u["leg"]) for u in d1["users"]} == {
            (loop1.dev_id, False), (mirror.dev_id, True)}
        assert d0["judged_by"] == "peers" and d1["smart"]["critical"] is False

        time.sleep(healthy_s)
        healthy = [t for t in mon.ticks if t["ts"] >= first["ts"]]
        assert len(healthy) >= healthy_s * 0.5
        flagged = [(t["ts"], n, t["drives"][n]) for t in healthy
                   for n in (nvme0.name, nvme1.name) if t["drives"][n]["flagged"]]
        assert not flagged, flagged[:3]

        set_delay(10)
        slowed = time.time()
        hit = mon.wait_for(_flagged(nvme0.name), 45, since=slowed)
        took = hit["ts"] - slowed
        print(f"nvme0 flagged {took:.1f} s after dm-delay went to 10 ms")
        assert took <= 30
        assert not any(t["drives"][nvme1.name]["flagged"] for t in mon.ticks)

        set_smart_critical_warning(nvme1, 4)   # reliability degraded
        critical = time.time()
        hit = mon.wait_for(lambda t: bool(t["drives"][nvme1.name]["smart_critical"]),
                           SMART_INTERVAL + 25, since=critical)
        took = hit["ts"] - critical
        print(f"nvme1 critical seen {took:.1f} s after the warning was set "
              f"(SMART interval {SMART_INTERVAL:g} s)")
        assert took <= SMART_INTERVAL + 20  # smartctl itself is slow under TCG

        # The alert, the recommendation, and the agent's answer: applied.
        deadline = time.monotonic() + 20
        answers: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not answers:
            log = list(read_jsonl(agent_dir / "monitor.jsonl"))
            answers = [r for r in log if r.get("what") == "answer"
                       and r.get("device") == os.path.basename(mirror.bdev)]
            time.sleep(0.5)
        log = list(read_jsonl(agent_dir / "monitor.jsonl"))
        smart = [r for r in log if r.get("kind") == "smart"]
        assert [r["drive"] for r in smart] == [nvme1.name], log
        assert "reliability degraded" in smart[0]["message"]
        assert answers and answers[0]["action"] == "demote_leg" and answers[0]["value"] == "1"
        assert answers[0]["status"] == "applied", answers
        # Approved by the kernel's checker: the monitor shares the mirror's lease.
        (mon_ext,) = [e for e in Registry(agent_dir).extensions() if e.cls == "monitor"]
        assert os.path.basename(mirror.bdev) in mon_ext.claims, mon_ext
        (applied,) = [r for r in read_jsonl(agent_dir / "audit.jsonl")
                      if r["type"] == "decision" and r["action"] == "demote_leg"
                      and r["status"] == "applied"]
        assert (applied["ext"], applied["checker"], applied["reason_code"]) == (
            mon_ext.id, "ebpf", "OK"), applied
        legs = AdminClient(mirror.dev_id).call("leg_info")["legs"]
        assert [leg["state"] for leg in legs] == ["active", "demoted"], legs
        out = subprocess.run([sys.executable, "-m", "ublk_driver", "monitor", "status"],
                             capture_output=True, text=True, check=True).stdout
        print(out)
        assert "CRITICAL" in out and "SLOW" in out
        # ... and `ublkml status` of each device, beside the drives under its paths.
        st = json.loads(subprocess.run([sys.executable, "-m", "ublk_driver", "status", "-n",
                                        str(loop0.dev_id), "--json"], capture_output=True,
                                       text=True, check=True).stdout)
        (d,) = st["paths"][0]["drives"]
        assert d["name"] == nvme0.name and d["verdict"]["state"] == "SLOW", d
        assert d["verdict"]["by"] == "monitor" and d["verdict"]["current"] is True
        out = subprocess.run([sys.executable, "-m", "ublk_driver", "status", "-n",
                              str(mirror.dev_id)], capture_output=True, text=True,
                             check=True).stdout
        assert f"{nvme1.name} (" in out and "[monitor: CRITICAL" in out, out


def test_lone_drive_is_flagged_against_its_own_baseline(
        emulated_drives: list[EmulatedDrive], tmp_path: Path,
        state_dirs: tuple[Path, Path]) -> None:
    lone = next(d for d in emulated_drives if d.kind == "nvme")
    with contextlib.ExitStack() as stack:
        dm, set_delay = stack.enter_context(dm_delay("ublkml-mon-lone", lone.path))
        fs = stack.enter_context(ext4(dm, tmp_path / "fs"))
        loop: Device = stack.enter_context(device("-t", "loop", "-f",
                                                  backing(fs / "b.img", 64)))
        stack.callback(set_delay, 0)   # the drive at full speed again before teardown
        mon = MonitorRun("--interval=1", "--window=10", "--baseline=15", "--flag-after=3",
                         "--rescan=2", "--no-agent", "--smart-interval=60")
        stack.callback(mon.stop)
        mon.wait_started(120)
        p = fio_load(loop.bdev, 150, 300)
        stack.callback(p.wait)
        stack.callback(p.kill)
        ready = mon.wait_for(lambda t: t["drives"].get(lone.name, {}).get("judged_by")
                             == "baseline", 90)
        time.sleep(5)
        assert not any(t["drives"][lone.name]["flagged"] for t in mon.ticks), mon.ticks[-1]
        assert ready["drives"][lone.name]["score"] is not None
        set_delay(5)
        slowed = time.time()
        hit = mon.wait_for(_flagged(lone.name), 45, since=slowed)
        took = hit["ts"] - slowed
        print(f"{lone.name} flagged {took:.1f} s after dm-delay went from 0 to 5 ms")
        assert took <= 30
        doc = json.loads((state_dirs[0] / "monitor.json").read_text())
        d = doc["drives"][lone.name]
        assert d["judged_by"] == "baseline" and d["baseline"]["state"] == "ready"
        assert "own baseline" in d["reason"] and d["users"][0]["dev_id"] == loop.dev_id
